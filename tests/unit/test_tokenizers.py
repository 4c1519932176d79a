"""Tokenizers of the training program and the data tool: tiny vocabularies built here, round trips,
eod/pad ids and vocabulary sizes with Megatron-LM's (and upstream FlagScale's) meaning, which class
`build_tokenizer` picks, and one short training run on a GPT2BPETokenizer-preprocessed corpus."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer, pre_tokenizers, processors

from flagscale.exceptions import ConfigError
from flagscale.train import arguments, tokenizer
from tools.datasets import preprocess_data, train_tokenizer

TEXT = "Once upon a time, there was a little cat. It sang: héllo wörld 🙂\n  twice."
CORPUS_LINES = [
    "Once upon a time, there was a little cat named Tom.",
    "The cat liked to play with a red ball in the garden.",
    "Two plus three is five. After Monday comes Tuesday.",
] * 40
GPT2_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
needs_sentencepiece = pytest.mark.skipif(not tokenizer.HAS_SENTENCEPIECE, reason="sentencepiece is not installed")


def write_gpt2_files(folder: Path) -> tuple[Path, Path]:
    """A GPT-2 style vocab.json (256 byte symbols, the merges' results, <|endoftext|> last) and merges.txt."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    for merge in GPT2_MERGES:
        vocab["".join(merge.split())] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab_file, merge_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merge_file.write_text("#version: 0.2\n" + "\n".join(GPT2_MERGES) + "\n", encoding="utf-8")
    return vocab_file, merge_file


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_gpt2_files(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(CORPUS_LINES) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A tiny Hugging Face folder as the tiny_gpt example makes it (unk, bos, eos, pad = ids 0..3)."""
    folder = tmp_path_factory.mktemp("hf")
    train_tokenizer.save_hf_folder(train_tokenizer.train_bpe([corpus], 300), folder, model_max_length=64)
    return folder


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path | None:
    """A tiny SentencePiece model with Llama's special ids (unk 0, bos 1, eos 2, no pad)."""
    if not tokenizer.HAS_SENTENCEPIECE:
        return None
    import sentencepiece

    prefix = tmp_path_factory.mktemp("sp") / "tiny"
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=80,
                                             model_type="bpe", minloglevel=2)  # fmt: skip
    return Path(f"{prefix}.model")


def with_added_tokens(source: Path, target: Path, tokens: list[str]) -> Path:
    """A copy of source/tokenizer.json with `tokens` added as special tokens; returns the file."""
    tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    tok.add_special_tokens(tokens)
    target.mkdir(parents=True, exist_ok=True)
    tok.save(str(target / "tokenizer.json"))
    return target / "tokenizer.json"


def test_gpt2_bpe_merges_eod_and_no_pad(gpt2_files: tuple[Path, Path]) -> None:
    tok = tokenizer.GPT2BPETokenizer(*map(str, gpt2_files))
    vocab = json.loads(gpt2_files[0].read_text())
    assert tok.vocab_size == len(vocab) == 256 + len(GPT2_MERGES) + 1
    assert tok.eod == vocab["<|endoftext|>"] == tok.vocab_size - 1
    assert tok.tokenize("hello world") == [vocab["hello"], vocab["Ġworld"]]
    assert tok.detokenize(tok.tokenize(TEXT)) == TEXT
    assert tok.eod not in tok.tokenize("a<|endoftext|>b")  # Megatron-LM encodes it as text
    with pytest.raises(AttributeError):
        _ = tok.pad


def test_gpt2_bpe_needs_its_files_and_eod(tmp_path: Path, gpt2_files: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="needs merge_file"):
        tokenizer.GPT2BPETokenizer(str(gpt2_files[0]), str(tmp_path / "missing.txt"))
    vocab = json.loads(gpt2_files[0].read_text())
    del vocab["<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ConfigError, match=re.escape("needs the end-of-document token <|endoftext|>")):
        tokenizer.GPT2BPETokenizer(str(tmp_path / "vocab.json"), str(gpt2_files[1]))


def test_aquila_eod_pad_and_special_tokens(tmp_path: Path, gpt2_files: tuple[Path, Path]) -> None:
    specials = tmp_path / "special_tokens.txt"
    specials.write_text("</s>\n<|endoftext|>\n[CLS]\n", encoding="utf-8")
    tok = tokenizer.AquilaTokenizerFS(str(gpt2_files[0]), str(gpt2_files[1]), str(specials))
    base = json.loads(gpt2_files[0].read_text())
    assert tok.vocab_size == len(base) + 2  # </s> and [CLS] are new; <|endoftext|> was there
    assert tok.pad == base["<|endoftext|>"] and tok.eod == len(base)
    assert tok.tokenize("hello</s>") == [base["hello"], tok.eod]


@needs_sentencepiece
def test_sentencepiece_appends_megatron_special_tokens(sp_model: Path) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    tok = tokenizer.SentencePieceTokenizer(str(sp_model), vocab_extra_ids=2)
    n = len(sp)
    # <CLS> <SEP> <EOD> <MASK> <PAD> (the model has no pad), then the sentinels; bos/eos are the model's.
    assert (tok.cls, tok.sep, tok.eod, tok.mask, tok.pad) == (n, n + 1, n + 2, n + 3, n + 4)
    assert tok.vocab_size == n + 7 and (tok.bos, tok.eos) == (sp.bos_id(), sp.eos_id())
    ids = tok.tokenize("the cat<EOD>a ball<extra_id_1>")
    assert ids == [*sp.encode_as_ids("the cat"), tok.eod, *sp.encode_as_ids("a ball"), n + 6]
    assert tok.detokenize(ids) == "the cat <EOD> a ball <extra_id_1> "
    assert tok.detokenize(tok.tokenize("Once upon a time")) == "Once upon a time"


@needs_sentencepiece
def test_llama2_and_gpt_sentencepiece_keep_the_model_vocabulary(sp_model: Path) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    llama = tokenizer.Llama2Tokenizer(str(sp_model))
    assert llama.vocab_size == len(sp) and llama.eod == llama.eos == sp.eos_id()
    assert llama.tokenize("the cat") == [sp.bos_id(), *sp.encode_as_ids("the cat")]
    assert llama.detokenize(llama.tokenize("the cat")) == "the cat"
    with pytest.raises(AttributeError):
        _ = llama.pad
    gpt = tokenizer.GPTSentencePieceTokenizer(str(sp_model))
    assert (gpt.vocab_size, gpt.eod, gpt.pad) == (len(sp), sp.eos_id(), sp.pad_id())
    assert gpt.tokenize("the cat") == sp.encode_as_ids("the cat")


def test_hugging_face_folder_types(hf_folder: Path) -> None:
    base = Tokenizer.from_file(str(hf_folder / "tokenizer.json")).get_vocab_size(with_added_tokens=False)
    hf = tokenizer.HFTokenizer(hf_folder)
    fs = tokenizer.HFTokenizerFS(hf_folder)
    llama3 = tokenizer.Llama3TokenizerFS(hf_folder / "tokenizer.json")  # the file works as well as the folder
    assert (hf.eod, hf.pad, hf.bos) == (fs.eod, fs.pad, fs.cls) == (2, 3, 1)
    assert (hf.vocab_size, fs.vocab_size, llama3.vocab_size) == (base, base, base + 4)  # 4 added special tokens
    for tok in (hf, fs, llama3):
        assert tok.detokenize(tok.tokenize(TEXT)) == TEXT


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_fs_types_agree_with_transformers(tmp_path: Path, hf_folder: Path) -> None:
    """Upstream builds HFTokenizerFS/Llama3TokenizerFS with AutoTokenizer: same ids, sizes and tokens."""
    from transformers import AutoTokenizer

    folder = tmp_path / "with_bos"
    folder.mkdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_text((hf_folder / name).read_text())
    tok = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    tok.add_special_tokens(["<|reserved_0|>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    for path in (hf_folder, folder):
        reference = AutoTokenizer.from_pretrained(str(path))
        fs, llama3 = tokenizer.HFTokenizerFS(path), tokenizer.Llama3TokenizerFS(path)
        assert fs.vocab_size == reference.vocab_size
        assert llama3.vocab_size == reference.vocab_size + len(reference.get_added_vocab())
        assert (fs.eod, fs.pad, fs.cls) == (reference.eos_token_id, reference.pad_token_id, reference.bos_token_id)
        assert fs.tokenize(TEXT) == reference.encode(TEXT)


def test_qwen_picks_upstream_eod_and_pad(tmp_path: Path, hf_folder: Path) -> None:
    path = with_added_tokens(hf_folder, tmp_path / "qwen", ["<|endoftext|>", "<|extra_203|>", "<|extra_204|>"])
    tok = tokenizer.QwenTokenizerFS(path.parent)
    vocab = Tokenizer.from_file(str(path)).get_vocab()
    assert (tok.eod, tok.cls, tok.pad) == (vocab["<|extra_204|>"], vocab["<|extra_203|>"], vocab["<|endoftext|>"])
    with pytest.raises(ConfigError, match=re.escape("needs the tokens <|extra_204|>")):
        tokenizer.QwenTokenizerFS(with_added_tokens(hf_folder, tmp_path / "bad", ["<|endoftext|>", "<|extra_203|>"]))


def test_special_ids_past_the_padded_vocabulary_are_one_config_error(tmp_path: Path, hf_folder: Path) -> None:
    """QwenTokenizerFS counts only the base vocabulary, as upstream's does: its eod (an added token) must still
    fall inside the padded embedding, or training would index past it."""
    tok = tokenizer.QwenTokenizerFS(
        with_added_tokens(hf_folder, tmp_path / "qwen", ["<|endoftext|>", "<|extra_203|>", "<|extra_204|>"]).parent
    )
    assert tok.eod >= tok.vocab_size  # an added token
    tokenizer.check_special_ids(tok, tokenizer.padded_vocab_size(tok.vocab_size, 128, 1))
    with pytest.raises(ConfigError, match=f"eod id {tok.eod} is outside the model's vocabulary of {tok.vocab_size}"):
        tokenizer.check_special_ids(tok, tok.vocab_size)


def test_hf_tokenizers_json_eod_pad_and_size(tmp_path: Path, hf_folder: Path) -> None:
    path = with_added_tokens(hf_folder, tmp_path / "a", ["<|endoftext|>", "<|padding|>"])
    tok = tokenizer.HFTokenizersTokenizerFS(str(path))
    reference = Tokenizer.from_file(str(path))
    assert tok.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    assert (tok.eod, tok.pad) == (reference.token_to_id("<|endoftext|>"), reference.token_to_id("<|padding|>"))
    no_pad = tokenizer.HFTokenizersTokenizerFS(with_added_tokens(hf_folder, tmp_path / "b", ["<|endoftext|>"]))
    with pytest.raises(AttributeError):
        _ = no_pad.pad
    with pytest.raises(ConfigError, match="no end-of-document token"):
        tokenizer.HFTokenizersTokenizerFS(hf_folder)


def training_args(*extra: str) -> argparse.Namespace:
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2", "--seq-length", "64",
            "--micro-batch-size", "1", "--train-iters", "2", "--lr", "1e-3", "--mock-data"]  # fmt: skip
    return arguments.build_parser().parse_args([*base, *extra])


def test_build_tokenizer_picks_the_class(
    tmp_path: Path, gpt2_files: tuple[Path, Path], hf_folder: Path, sp_model: Path
) -> None:
    qwen = with_added_tokens(hf_folder, tmp_path / "qwen", ["<|endoftext|>", "<|extra_203|>", "<|extra_204|>"])
    files = {
        "HuggingFaceTokenizer": ["--tokenizer-model", str(hf_folder)],
        "GPT2BPETokenizer": ["--vocab-file", str(gpt2_files[0]), "--merge-file", str(gpt2_files[1])],
        "SentencePieceTokenizer": ["--tokenizer-model", str(sp_model)],
        "GPTSentencePieceTokenizer": ["--tokenizer-model", str(sp_model)],
        "Llama2Tokenizer": ["--tokenizer-model", str(sp_model)],
        "HFTokenizerFS": ["--tokenizer-path", str(hf_folder)],
        "Llama3TokenizerFS": ["--tokenizer-path", str(hf_folder)],
        "QwenTokenizerFS": ["--tokenizer-path", str(qwen)],
        "HFTokenizersTokenizerFS": ["--tokenizer-path", str(qwen)],
        "NullTokenizer": ["--vocab-size", "128"],
    }
    for kind in tokenizer.TOKENIZER_TYPES:
        if kind == "AquilaTokenizerFS":
            continue  # covered above (it needs its special-tokens file)
        args = training_args("--tokenizer-type", kind, *files[kind])
        assert arguments.checked(args, 1).tokenizer_type == kind
        assert type(tokenizer.build_tokenizer(args)).__name__ == {"HuggingFaceTokenizer": "HFTokenizer"}.get(kind, kind)


def test_missing_tokenizer_arguments_are_named() -> None:
    with pytest.raises(ConfigError, match="tokenizer_type GPT2BPETokenizer needs vocab_file and merge_file"):
        arguments.validate(training_args("--tokenizer-type", "GPT2BPETokenizer"), 1)
    with pytest.raises(ConfigError, match="tokenizer_type QwenTokenizerFS needs tokenizer_path"):
        arguments.validate(training_args("--tokenizer-type", "QwenTokenizerFS"), 1)
    with pytest.raises(ConfigError, match="vocab_extra_ids applies to SentencePieceTokenizer only"):
        arguments.validate(training_args("--tokenizer-type", "NullTokenizer", "--vocab-size", "8",
                                         "--vocab-extra-ids", "2"), 1)  # fmt: skip
    assert "tokenizer_path" in arguments.implemented_keys()
    assert {"GPT2BPETokenizer", "QwenTokenizerFS"} <= set(arguments.implemented_choices("tokenizer_type"))


def test_preprocess_names_missing_files(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        preprocess_data.main(["--input", "x.jsonl", "--output-prefix", "y", "--tokenizer-type", "GPT2BPETokenizer"])
    assert "--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file" in capsys.readouterr().err


@pytest.mark.integration
def test_training_on_a_gpt2_bpe_corpus(tiny_data: Path, tmp_path: Path) -> None:
    """The tiny_gpt tokenizer's BPE as vocab.json + merges.txt (plus <|endoftext|>), preprocessed and trained."""
    from tests.integration.test_train_program import SMALL_MODEL, events, torchrun, train_losses

    Tokenizer.from_file(str(tiny_data / "tokenizer" / "tokenizer.json")).model.save(str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps({**vocab, "<|endoftext|>": len(vocab)}))
    files = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(tmp_path / "vocab.json"),
             "--merge-file", str(tmp_path / "merges.txt")]  # fmt: skip
    (prefix,) = preprocess_data.main(["--input", str(tiny_data / "corpus" / "stories.jsonl"), "--append-eod",
                                      "--output-prefix", str(tmp_path / "stories"), *files])  # fmt: skip
    run = torchrun(*SMALL_MODEL, *files, "--data-path", prefix, "--train-iters", "20",
                   "--metrics-dir", str(tmp_path / "metrics"))  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    assert f"vocab 1024 (tokenizer {len(vocab) + 1})" in run.stdout
    losses = train_losses(events(tmp_path / "metrics"))
    assert sorted(losses) == [5, 10, 15, 20] and losses[20] < losses[5] - 1.0, losses
