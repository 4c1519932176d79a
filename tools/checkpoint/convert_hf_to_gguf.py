"""Convert a Hugging Face Llama folder (as convert_megatron_to_hf.py writes it) to one GGUF file for llama.cpp.

    python tools/checkpoint/convert_hf_to_gguf.py --input outputs/tiny_gpt/hf --output outputs/tiny_gpt/gguf/model.gguf

Written with the `gguf` package (the format library of the llama.cpp project): architecture `llama`, the config
as its metadata keys, every tensor under llama.cpp's name (q/k projections reordered from Hugging Face's
half-split rotary layout to llama.cpp's interleaved one), and a byte-level BPE tokenizer (`gpt2` model, GPT-2
pre-tokenizer) with its merges, special tokens and chat template. `--dtype f32` (default) keeps the weights
exact; `f16` halves the file. What the `llama` architecture cannot hold is refused in one line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run by path: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.checkpoint.errors import ConversionError

LAYER_TENSORS = {  # Hugging Face name (in model.layers.N.) -> llama.cpp name (in blk.N.)
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path, help="Hugging Face model folder (LlamaForCausalLM)")
    parser.add_argument("--output", required=True, type=Path, help="the .gguf file to write")
    parser.add_argument("--dtype", choices=("f32", "f16"), default="f32", help="weight type (norms stay f32)")
    return parser


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no config.json; --input takes a Hugging Face model folder, e.g. one "
                              "written by tools/checkpoint/convert_megatron_to_hf.py")
    config = json.loads(path.read_text())
    if config.get("architectures") != ["LlamaForCausalLM"]:
        raise ConversionError(f"{path}: architectures {config.get('architectures')}; this converter writes the llama "
                              "architecture (LlamaForCausalLM) only")
    for key, allowed in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if config.get(key, allowed) != allowed:
            raise ConversionError(f"{path}: {key}={config[key]} is not supported (llama: {key}={allowed})")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"{path}: rope_type {rope['rope_type']} is not supported; only plain RoPE")
    return config


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{folder} has no *.safetensors weights")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def interleave_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows from Hugging Face's rotary layout (each head: first half, second half) to llama.cpp's
    (pairs side by side), as llama.cpp's `llama` architecture rotates adjacent pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(config: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor under its llama.cpp name, in llama.cpp's layout."""
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    out: dict[str, np.ndarray] = {}
    for name, target in GLOBAL_TENSORS.items():
        if name in tensors:
            out[target] = tensors.pop(name)
    if "output.weight" not in out and not config.get("tie_word_embeddings"):
        raise ConversionError("no lm_head.weight and tie_word_embeddings is false; the folder is incomplete")
    for layer in range(config["num_hidden_layers"]):
        for name, target in LAYER_TENSORS.items():
            key = f"model.layers.{layer}.{name}"
            if key not in tensors:
                raise ConversionError(f"missing tensor {key}; the folder is incomplete")
            value = tensors.pop(key)
            if name == "self_attn.q_proj.weight":
                value = interleave_rotary(value, heads)
            elif name == "self_attn.k_proj.weight":
                value = interleave_rotary(value, kv_heads)
            out[f"blk.{layer}.{target}"] = value
    left = [k for k in tensors if not k.endswith("rotary_emb.inv_freq")]
    if left:
        raise ConversionError(f"tensors the llama architecture has no place for: {', '.join(sorted(left)[:5])}")
    return out


def tokenizer_metadata(folder: Path) -> dict[str, Any]:
    """A byte-level BPE tokenizer.json as GGUF tokenizer keys."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no tokenizer.json (a byte-level BPE tokenizer is needed)")
    data = json.loads(path.read_text())
    model = data["model"]
    if model.get("type") != "BPE" or (data.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise ConversionError(f"{path}: a {model.get('type')} tokenizer with a "
                              f"{(data.get('pre_tokenizer') or {}).get('type')} pre-tokenizer; only byte-level BPE "
                              "(GPT-2 style) converts")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab.update(special)
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED until named
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = 3 if token in special else 1  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text()) if config_path.is_file() else {}

    def token_id(key: str) -> int | None:
        value = tok_config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return vocab.get(value) if isinstance(value, str) else None

    template_file = folder / "chat_template.jinja"  # where transformers 5 keeps it
    template = template_file.read_text() if template_file.is_file() else tok_config.get("chat_template")
    return {"tokens": tokens, "types": types, "merges": merges, "chat_template": template,
            "ids": {k: token_id(f"{k}_token") for k in ("bos", "eos", "unk", "pad")},
            "add_bos": bool(tok_config.get("add_bos_token", False)),
            "add_eos": bool(tok_config.get("add_eos_token", False))}


def write_gguf(config: dict[str, Any], weights: dict[str, np.ndarray], tokenizer: dict[str, Any], output: Path,
               dtype: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer = gguf.GGUFWriter(str(output), "llama")
    writer.add_name(output.stem)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(tokenizer["types"])
    writer.add_token_merges(tokenizer["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if tokenizer["ids"][key] is not None:
            add(tokenizer["ids"][key])
    writer.add_add_bos_token(tokenizer["add_bos"])
    writer.add_add_eos_token(tokenizer["add_eos"])
    if tokenizer["chat_template"]:
        writer.add_chat_template(tokenizer["chat_template"])
    for name, value in weights.items():
        keep_f32 = dtype == "f32" or value.ndim == 1
        writer.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32 if keep_f32 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def convert(source: Path, output: Path, dtype: str = "f32") -> str:
    """Convert; returns a one-line summary."""
    config = read_config(source)
    tokenizer = tokenizer_metadata(source)
    if len(tokenizer["tokens"]) > config["vocab_size"]:
        raise ConversionError(f"the tokenizer has {len(tokenizer['tokens'])} tokens but vocab_size is "
                              f"{config['vocab_size']}")
    tokenizer["tokens"] += [f"[PAD{i}]" for i in range(len(tokenizer["tokens"]), config["vocab_size"])]
    tokenizer["types"] += [5] * (config["vocab_size"] - len(tokenizer["types"]))
    weights = gguf_tensors(config, read_tensors(source))
    output.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(config, weights, tokenizer, output, dtype)
    size = output.stat().st_size / 2**20
    return (f"converted {source} -> {output} (llama, {len(weights)} tensors, {dtype}, vocab {config['vocab_size']}, "
            f"{size:.1f} MiB)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        print(convert(args.input, args.output, args.dtype))
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done in {time.monotonic() - started:.1f}s; serve it, e.g.: flagscale serve tiny_gpt serve_llama_cpp "
          f"--model-path {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
