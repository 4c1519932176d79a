"""tools/checkpoint/convert_hf_to_gguf.py on a small random Llama written by transformers: the GGUF file read back
with the gguf package has llama.cpp's metadata for the config, every tensor (q/k in llama.cpp's interleaved rotary
layout, the rest unchanged), and the byte-level BPE tokenizer with its merges, special tokens and chat template;
what the llama architecture cannot hold is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tools.checkpoint.convert_hf_to_gguf import convert, interleave_rotary
from tools.checkpoint.errors import ConversionError

HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB = 64, 4, 2, 2, 300


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                         head_dim=HIDDEN // HEADS, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["once upon a time there was a tiny model"] * 50, trainers.BpeTrainer(
        vocab_size=VOCAB - 20, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                      eos_token="</s>", pad_token="<pad>")
    wrapped.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    wrapped.save_pretrained(folder)
    return folder


def test_the_gguf_file_holds_the_model_as_llama_cpp_reads_it(hf_model: Path, tmp_path: Path) -> None:
    import gguf
    from safetensors.numpy import load_file

    out = tmp_path / "model.gguf"
    summary = convert(hf_model, out)
    assert f"{LAYERS * 9 + 3} tensors, f32, vocab {VOCAB}" in summary
    reader = gguf.GGUFReader(str(out))

    def value(key: str):
        field = reader.fields[key]
        return field.contents()

    assert value("general.architecture") == "llama"
    assert (value("llama.block_count"), value("llama.embedding_length"), value("llama.attention.head_count"),
            value("llama.attention.head_count_kv"), value("llama.rope.dimension_count")) == (
        LAYERS, HIDDEN, HEADS, KV_HEADS, HIDDEN // HEADS)
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    tokens = value("tokenizer.ggml.tokens")
    vocab = json.loads((hf_model / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(tokens) == VOCAB and all(tokens[i] == t for t, i in vocab.items())
    assert value("tokenizer.ggml.bos_token_id") == vocab["<s>"]
    assert value("tokenizer.ggml.eos_token_id") == vocab["</s>"]
    assert value("tokenizer.ggml.merges")[0] == " ".join(
        json.loads((hf_model / "tokenizer.json").read_text())["model"]["merges"][0])
    assert "m['content']" in value("tokenizer.chat_template")

    hf = load_file(str(hf_model / "model.safetensors"))
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    np.testing.assert_array_equal(tensors["token_embd.weight"], hf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(tensors["output.weight"], hf["lm_head.weight"])
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"], hf["model.layers.1.mlp.down_proj.weight"])
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"],
                                  interleave_rotary(hf["model.layers.0.self_attn.q_proj.weight"], HEADS))
    np.testing.assert_array_equal(tensors["blk.0.attn_k.weight"],
                                  interleave_rotary(hf["model.layers.0.self_attn.k_proj.weight"], KV_HEADS))


def test_interleaving_pairs_each_rotary_half_with_its_partner() -> None:
    head_dim = 8
    weight = np.arange(2 * head_dim, dtype=np.float32).reshape(2 * head_dim, 1)  # 2 heads, row i holds i
    rows = interleave_rotary(weight, 2)[:, 0].astype(int).tolist()
    assert rows == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_what_llama_cannot_hold_is_refused(hf_model: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((hf_model / "config.json").read_text())
    for change, message in (({"architectures": ["MixtralForCausalLM"]}, "LlamaForCausalLM) only"),
                            ({"attention_bias": True}, "attention_bias=True is not supported"),
                            ({"rope_parameters": {"rope_type": "yarn"}}, "rope_type yarn is not supported")):
        (other / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
            convert(other, tmp_path / "x.gguf")
    with pytest.raises(ConversionError, match="has no config.json"):
        convert(tmp_path / "missing", tmp_path / "x.gguf")
