"""Tokenizers the training program and the data tools share (torch-free).

`HFTokenizer` reads a Hugging Face tokenizer folder (tokenizer.json, special_tokens_map.json) with
the `tokenizers` library, so it works offline without `transformers`. `AquilaTokenizerFS` is upstream
FlagScale's byte-level BPE from a GPT-2 style vocab.json + merges.txt and a special-tokens file
(end of document `</s>`, padding `<|endoftext|>`). `NullTokenizer` serves mock data. All expose
what Megatron-Core's GPTDataset asks of a tokenizer: `vocab_size`, `eod`, `pad`
and `unique_identifiers`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from flagscale.exceptions import ConfigError


class HFTokenizer:
    """A Hugging Face tokenizer folder, read with the `tokenizers` library."""

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"tokenizer_model {self.folder} has no tokenizer.json")
        self._tokenizer = Tokenizer.from_file(str(path))
        self._specials = _special_tokens(self.folder)
        if "eos_token" not in self._specials:
            raise ConfigError(f"{self.folder}: no eos_token in special_tokens_map.json or tokenizer_config.json")

    def _token_id(self, role: str) -> int | None:
        token = self._specials.get(role)
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (before padding for tensor parallelism)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        """End-of-document id (the eos token)."""
        return self._token_id("eos_token")

    eos = eod

    @property
    def bos(self) -> int | None:
        """Beginning-of-sequence id, if the tokenizer has one."""
        return self._token_id("bos_token")

    @property
    def pad(self) -> int:
        """Padding id; AttributeError when there is none (GPTDataset then uses its own)."""
        pad = self._token_id("pad_token")
        if pad is None:
            raise AttributeError(f"{self.folder} has no pad_token")
        return pad

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What makes dataset caches built with this tokenizer distinct."""
        return OrderedDict(cls=type(self).__name__, tokenizer_path=str(self.folder.resolve()))

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts at once (parallel inside `tokenizers`)."""
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids: list[int]) -> str:
        """Text of token ids."""
        return self._tokenizer.decode(list(ids))


class AquilaTokenizerFS(HFTokenizer):
    """Byte-level BPE from `vocab_file`/`merge_file`, special tokens one per line in `special_tokens_file`."""

    def __init__(self, vocab_file: str, merge_file: str, special_tokens_file: str | None) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        for name, path in (("vocab_file", vocab_file), ("merge_file", merge_file)):
            if not path or not Path(path).is_file():
                raise ConfigError(f"tokenizer_type AquilaTokenizerFS needs {name} (a file), got {path!r}")
        self.folder = Path(vocab_file).parent
        self._tokenizer = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tokenizer.decoder = decoders.ByteLevel()
        specials = Path(special_tokens_file).read_text(encoding="utf-8").split("\n") if special_tokens_file else []
        self._tokenizer.add_special_tokens([t for t in specials if t])
        self._specials = {"eos_token": "</s>", "pad_token": "<|endoftext|>"}
        if self._tokenizer.token_to_id("</s>") is None:
            raise ConfigError(f"{vocab_file}: AquilaTokenizerFS needs the end-of-document token </s>")

    @property
    def vocab_size(self) -> int:
        """Number of token ids in vocab.json plus special tokens not in it."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)


class NullTokenizer:
    """A vocabulary of `vocab_size` ids with no text; the last id is end-of-document."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eod = self.eos = vocab_size - 1

    @property
    def pad(self) -> int:
        """No padding id (GPTDataset then uses its own)."""
        raise AttributeError("NullTokenizer has no pad token")

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What makes dataset caches built with this tokenizer distinct."""
        return OrderedDict(cls=type(self).__name__, vocab_size=self.vocab_size)


def _special_tokens(folder: Path) -> dict[str, str]:
    """Role -> token text from special_tokens_map.json, falling back to tokenizer_config.json."""
    specials: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
                value = data.get(role)
                if isinstance(value, dict):  # {"content": "</s>", ...} form
                    value = value.get("content")
                if value:
                    specials[role] = value
    return specials


TOKENIZER_TYPES = ("HuggingFaceTokenizer", "NullTokenizer", "AquilaTokenizerFS")


def build_tokenizer(args):
    """The tokenizer `--tokenizer-type` names (with its files from the other tokenizer arguments)."""
    kind = args.tokenizer_type
    if kind == "HuggingFaceTokenizer":
        return HFTokenizer(args.tokenizer_model)
    if kind == "NullTokenizer":
        return NullTokenizer(args.vocab_size)
    if kind == "AquilaTokenizerFS":
        return AquilaTokenizerFS(args.vocab_file, args.merge_file, args.special_tokens_file)
    raise ConfigError(f"tokenizer_type {kind} is not implemented here (implemented: {', '.join(TOKENIZER_TYPES)})")


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron-LM's padding: round up to a multiple of divisible_by × TP."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple
