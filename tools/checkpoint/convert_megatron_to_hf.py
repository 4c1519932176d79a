"""Convert a Megatron-Core checkpoint from FlagScale training to a Hugging Face Llama, Mixtral or DeepSeek-V3 folder.

    python tools/checkpoint/convert_megatron_to_hf.py --load outputs/tiny_gpt/checkpoints --output outputs/tiny_gpt/hf

Reads the latest iteration (or --iteration N) of a torch_dist checkpoint, whatever tensor/pipeline/
expert parallel sizes the training used, with the training program's own model builder. The
architecture follows the saved training arguments: a dense model becomes LlamaForCausalLM, an MoE
model (num_experts) MixtralForCausalLM, a multi-latent-attention model (DeepSeek-V3-like: MLA, sigmoid
router, shared experts, dense first layers) DeepseekV3ForCausalLM without its multi-token-prediction
layers, and what the chosen architecture cannot represent is refused in one line. Writes
config.json, generation_config.json, model.safetensors and the tokenizer files (copied from the
training's --tokenizer-model folder, or --tokenizer-dir), loadable by transformers and vLLM.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

if __package__ in (None, ""):  # run by path: make `tools` and `flagscale` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.checkpoint import deepseek_v3_mapping, llama_mapping, mixtral_mapping
from tools.checkpoint.errors import ConversionError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, type=Path, help="The training's checkpoint folder (its --save).")
    parser.add_argument("--output", required=True, type=Path, help="The Hugging Face folder to write.")
    parser.add_argument("--iteration", type=int, help="Convert this iteration (default: the latest).")
    parser.add_argument("--tokenizer-dir", type=Path,
                        help="Tokenizer folder to copy (default: the training's --tokenizer-model).")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="Weights' dtype in the output (default: the training's parameter dtype).")
    return parser


def mapping_for(training: argparse.Namespace) -> ModuleType:
    """The mapping module of the Hugging Face architecture the training's model corresponds to."""
    if getattr(training, "multi_latent_attention", False):
        return deepseek_v3_mapping
    return mixtral_mapping if getattr(training, "num_experts", None) else llama_mapping


def check(training: argparse.Namespace) -> None:
    """Refuse, before the model is built, a training whose model has no Hugging Face equivalent here."""
    mapping_for(training).check_compatible(training)


def tokenizer_dir(args: argparse.Namespace, training: argparse.Namespace) -> Path:
    """The tokenizer folder to copy; an error naming --tokenizer-dir if there is none."""
    folder = args.tokenizer_dir or (Path(training.tokenizer_model) if training.tokenizer_model else None)
    if folder is None or (not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file()):
        raise ConversionError(f"no tokenizer at {folder} (the training's --tokenizer-model); "
                              "pass --tokenizer-dir DIR with the Hugging Face tokenizer files")
    return folder


def special_ids(folder: Path) -> dict[str, int | None]:
    """bos/eos/pad token ids of a tokenizer folder, by the training program's tokenizer reader."""
    from flagscale.train.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(folder)
    ids = {"bos_token": tokenizer.bos, "eos_token": tokenizer.eos}
    try:
        ids["pad_token"] = tokenizer.pad
    except AttributeError:
        ids["pad_token"] = None
    return ids


def copy_tokenizer(folder: Path, output: Path) -> list[str]:
    """Copy the tokenizer's files; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, output / name)
            copied.append(name)
    return copied


def write_generation_config(output: Path, ids: dict[str, int | None]) -> None:
    """Only the token ids: vLLM takes sampling defaults from this file, so none are set here."""
    config = {"bos_token_id": ids["bos_token"], "eos_token_id": ids["eos_token"], "pad_token_id": ids["pad_token"]}
    (output / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def convert(args: argparse.Namespace) -> Path:
    """Load, map, write; return the output folder."""
    import torch
    from safetensors.torch import save_file

    from tools.checkpoint import megatron_loader  # Megatron's import-time warnings come after main's filters

    loaded = megatron_loader.load(args.load, args.iteration, check=check)
    try:
        training = loaded.args
        mapping = mapping_for(training)
        folder = tokenizer_dir(args, training)
        dtype = llama_mapping.dtype_name(training) if args.dtype == "auto" else args.dtype
        tensors = mapping.to_hf_state_dict(loaded.model.state_dict(), training)
        fp32 = getattr(mapping, "FP32_SUFFIXES", ())  # kept in float32 whatever the dtype (DeepseekV3's routing bias)
        tensors = {name: t.to(torch.float32 if name.endswith(fp32) else getattr(torch, dtype))
                   for name, t in tensors.items()}
        vocab = tensors["model.embed_tokens.weight"].shape[0]
    finally:
        megatron_loader.shutdown()
    ids = special_ids(folder)
    args.output.mkdir(parents=True, exist_ok=True)
    mapping.hf_config(training, vocab, ids, dtype).save_pretrained(args.output)
    save_file(tensors, str(args.output / "model.safetensors"), metadata={"format": "pt"})
    write_generation_config(args.output, ids)
    copied = copy_tokenizer(folder, args.output)
    print(f"converted {loaded.path} (iteration {loaded.iteration}, trained with {layout(training)}) -> "
          f"{args.output} as {mapping.ARCHITECTURE}")
    print(f"  {len(tensors)} tensors ({dtype}), vocab {vocab}; tokenizer files from {folder}: {', '.join(copied)}")
    for note in getattr(mapping, "notes", lambda _: [])(training):
        print(f"  note: {note}")
    return args.output


def layout(training: argparse.Namespace) -> str:
    """The training's parallel layout, in the start line's words."""
    words = f"tp={training.tensor_model_parallel_size} pp={training.pipeline_model_parallel_size}"
    if getattr(training, "num_experts", None):
        words += f" ep={training.expert_model_parallel_size} ({training.num_experts} experts)"
    return words


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; a ConversionError is one line on stderr and exit status 1."""
    args = build_parser().parse_args(argv)
    for module in (r"megatron\..*", r"torch\..*", r"flagscale\.train\..*"):  # their deprecation chatter
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
    start = time.perf_counter()
    try:
        output = convert(args)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - start:.1f}s; serve it, e.g.: flagscale serve tiny_gpt --model-path {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
