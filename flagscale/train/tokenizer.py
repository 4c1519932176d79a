"""Tokenizers the training program and the data tools share (torch-free, offline).

Each class gives what Megatron-Core's GPTDataset and the data tools ask of a tokenizer:
`vocab_size`, `eod`, `pad` (an AttributeError when there is none: GPTDataset then uses its own),
`unique_identifiers`, `tokenize`/`tokenize_batch` and `detokenize`, with Megatron-LM's meaning
for each `--tokenizer-type`:

- HuggingFaceTokenizer: a Hugging Face tokenizer folder (`tokenizer_model`), read with the
  `tokenizers` library; no special tokens are added on encode.
- GPT2BPETokenizer: byte-level BPE from `vocab_file` + `merge_file`; eod `<|endoftext|>`, no pad,
  vocab size = entries of vocab.json.
- SentencePieceTokenizer / GPTSentencePieceTokenizer / Llama2Tokenizer: a SentencePiece `.model`
  (`tokenizer_model`), only when the `sentencepiece` package is installed. The first appends
  <CLS> <SEP> <EOD> <MASK> (and pad/bos/eos and `vocab_extra_ids` sentinels when missing) to the
  vocabulary, eod = <EOD>; the other two keep the model's vocabulary, eod = eos, and Llama2Tokenizer
  starts every text with bos and has no pad.
- upstream FlagScale's `*FS` types, read from `tokenizer_path` (a folder with tokenizer.json, or
  the file): AquilaTokenizerFS (vocab_file/merge_file/special_tokens_file; eod `</s>`, pad
  `<|endoftext|>`), HFTokenizerFS (eos/pad/bos of the folder's config; vocab size without added
  tokens), Llama3TokenizerFS (vocab size plus every added token), QwenTokenizerFS (eod
  `<|extra_204|>`, pad `<|endoftext|>`), HFTokenizersTokenizerFS (a bare tokenizer.json; eod
  `<|endoftext|>`, pad `<|padding|>`, vocab size with added tokens). Upstream loads the first
  three with `transformers.AutoTokenizer`; the `tokenizers` library reads the same tokenizer.json.
- NullTokenizer: `vocab_size` ids with no text, for mock data.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from flagscale.exceptions import ConfigError

HAS_SENTENCEPIECE = importlib.util.find_spec("sentencepiece") is not None
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
FS_PATH_TYPES = ("HFTokenizerFS", "Llama3TokenizerFS", "QwenTokenizerFS", "HFTokenizersTokenizerFS")

# The tokenizer arguments each type needs (all of them, as files or folders).
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "HuggingFaceTokenizer": ("tokenizer_model",),
    "GPT2BPETokenizer": ("vocab_file", "merge_file"),
    "AquilaTokenizerFS": ("vocab_file", "merge_file"),
    **{kind: ("tokenizer_model",) for kind in SENTENCEPIECE_TYPES if HAS_SENTENCEPIECE},
    **{kind: ("tokenizer_path",) for kind in FS_PATH_TYPES},
}
TOKENIZER_TYPES = (*REQUIRED_FILES, "NullTokenizer")
TEXT_TOKENIZER_TYPES = tuple(REQUIRED_FILES)


def _file(name: str, path: str | Path | None, kind: str) -> Path:
    if not path or not Path(path).is_file():
        raise ConfigError(f"tokenizer_type {kind} needs {name} (a file), got {path!r}")
    return Path(path)


class TextTokenizer:
    """What every text tokenizer shares: batches, identifiers for dataset caches, missing pad/bos."""

    files: tuple[Path, ...] = ()

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`."""
        raise NotImplementedError

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts."""
        return [self.tokenize(text) for text in texts]

    @property
    def pad(self) -> int:
        """Padding id; AttributeError when there is none (GPTDataset then uses its own)."""
        raise AttributeError(f"{type(self).__name__} has no pad token")

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id; AttributeError when there is none."""
        raise AttributeError(f"{type(self).__name__} has no bos token")

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What makes dataset caches built with this tokenizer distinct."""
        return OrderedDict(cls=type(self).__name__, tokenizer_path=[str(p.resolve()) for p in self.files])


class _TokenizersBackend(TextTokenizer):
    """A `tokenizers.Tokenizer` with special tokens named by role (eos_token, pad_token, ...)."""

    _add_special_tokens = False
    _specials: dict[str, str]

    def _token_id(self, role: str) -> int | None:
        token = self._specials.get(role)
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (before padding for tensor parallelism)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        """End-of-document id (the eos token)."""
        return self._token_id("eos_token")

    @property
    def eos(self) -> int:
        """End-of-sequence id."""
        return self.eod

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id; AttributeError when there is none."""
        bos = self._token_id("bos_token")
        if bos is None:
            raise AttributeError(f"{type(self).__name__} has no bos token")
        return bos

    @property
    def pad(self) -> int:
        """Padding id; AttributeError when there is none (GPTDataset then uses its own)."""
        pad = self._token_id("pad_token")
        if pad is None:
            raise AttributeError(f"{type(self).__name__} has no pad token")
        return pad

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`."""
        return self._tokenizer.encode(text, add_special_tokens=self._add_special_tokens).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once (parallel inside `tokenizers`)."""
        encoded = self._tokenizer.encode_batch(list(texts), add_special_tokens=self._add_special_tokens)
        return [e.ids for e in encoded]

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of token ids."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


class HFTokenizer(_TokenizersBackend):
    """HuggingFaceTokenizer: a Hugging Face tokenizer folder, read with the `tokenizers` library."""

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

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What makes dataset caches built with this tokenizer distinct."""
        return OrderedDict(cls=type(self).__name__, tokenizer_path=str(self.folder.resolve()))


def _byte_level_bpe(vocab_file: Path, merge_file: Path):
    """GPT-2's byte-level BPE (its regex split, no prefix space) from vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE.from_file(str(vocab_file), str(merge_file)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


class GPT2BPETokenizer(_TokenizersBackend):
    """Megatron-LM's GPT-2 BPE: vocab.json + merges.txt, eod `<|endoftext|>` (encoded as text in input)."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        kind = "GPT2BPETokenizer"
        self.files = (_file("vocab_file", vocab_file, kind), _file("merge_file", merge_file, kind))
        self._tokenizer = _byte_level_bpe(*self.files)
        self._specials = {"eos_token": "<|endoftext|>"}
        if self.eod is None:
            raise ConfigError(f"{vocab_file}: GPT2BPETokenizer needs the end-of-document token <|endoftext|>")

    @property
    def vocab_size(self) -> int:
        """Entries of vocab.json."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)


class AquilaTokenizerFS(_TokenizersBackend):
    """Byte-level BPE from `vocab_file`/`merge_file`, special tokens one per line in `special_tokens_file`."""

    def __init__(self, vocab_file: str, merge_file: str, special_tokens_file: str | None) -> None:
        kind = "AquilaTokenizerFS"
        self.files = (_file("vocab_file", vocab_file, kind), _file("merge_file", merge_file, kind))
        self.folder = self.files[0].parent
        self._tokenizer = _byte_level_bpe(*self.files)
        specials = Path(special_tokens_file).read_text(encoding="utf-8").split("\n") if special_tokens_file else []
        self._tokenizer.add_special_tokens([t for t in specials if t])
        self._specials = {"eos_token": "</s>", "pad_token": "<|endoftext|>"}
        if self._tokenizer.token_to_id("</s>") is None:
            raise ConfigError(f"{vocab_file}: AquilaTokenizerFS needs the end-of-document token </s>")


def _tokenizer_json(path: str | Path | None, kind: str) -> Path:
    """tokenizer_path as a tokenizer.json file (the file itself, or the one in the folder)."""
    if not path:
        raise ConfigError(f"tokenizer_type {kind} needs tokenizer_path (a tokenizer folder or tokenizer.json)")
    path = Path(path)
    found = path / "tokenizer.json" if path.is_dir() else path
    if not found.is_file():
        raise ConfigError(f"tokenizer_path {path} is not a tokenizer.json file or a folder with one ({kind})")
    return found


class HFTokenizerFS(_TokenizersBackend):
    """Upstream FlagScale's HFTokenizerFS: eos/pad/bos from the folder's config, base vocabulary size."""

    _add_special_tokens = True  # upstream encodes with the tokenizer's own template (bos, if any)

    def __init__(self, tokenizer_path: str | Path) -> None:
        from tokenizers import Tokenizer

        path = _tokenizer_json(tokenizer_path, type(self).__name__)
        self.files = (path,)
        self._tokenizer = Tokenizer.from_file(str(path))
        self._specials = self._roles(path.parent)
        if self.eod is None:
            raise ConfigError(f"{tokenizer_path}: {type(self).__name__} finds no end-of-document token "
                              f"({self._specials.get('eos_token', 'no eos_token in the config')})")

    def _roles(self, folder: Path) -> dict[str, str]:
        return _special_tokens(folder)

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary without added tokens (what `transformers` calls vocab_size)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    @property
    def cls(self) -> int | None:
        """Upstream's cls id (the bos token)."""
        return self._token_id("bos_token")


class Llama3TokenizerFS(HFTokenizerFS):
    """HFTokenizerFS whose vocab size counts every added token too, as upstream's does."""

    @property
    def vocab_size(self) -> int:
        """Base vocabulary plus the number of added tokens."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False) + len(self._tokenizer.get_added_tokens_decoder())


class QwenTokenizerFS(HFTokenizerFS):
    """Qwen: eod `<|extra_204|>`, cls `<|extra_203|>`, pad `<|endoftext|>` (upstream's choice)."""

    def _roles(self, folder: Path) -> dict[str, str]:
        roles = {"eos_token": "<|extra_204|>", "bos_token": "<|extra_203|>", "pad_token": "<|endoftext|>"}
        missing = [t for t in roles.values() if self._tokenizer.token_to_id(t) is None]
        if missing:
            raise ConfigError(f"{self.files[0]}: QwenTokenizerFS needs the tokens {', '.join(missing)}")
        return roles


class HFTokenizersTokenizerFS(HFTokenizerFS):
    """A bare tokenizer.json: eod `<|endoftext|>`, pad `<|padding|>`, vocab size with added tokens."""

    def _roles(self, folder: Path) -> dict[str, str]:
        return {"eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}

    @property
    def vocab_size(self) -> int:
        """Every id, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def cls(self) -> None:
        """No cls token."""
        return None


class SentencePieceTokenizer(TextTokenizer):
    """Megatron-LM's SentencePieceTokenizer: the model's pieces, then special tokens it lacks.

    Appended when missing: <CLS> <SEP> <EOD> <MASK>, the pad/bos/eos pieces (<PAD>/<BOS>/<EOS> when
    the model has none) and `vocab_extra_ids` sentinels <extra_id_N>. Special tokens in the text are
    encoded as themselves; eod is <EOD>.
    """

    def __init__(self, model_file: str, vocab_extra_ids: int = 0) -> None:
        import sentencepiece

        self.files = (_file("tokenizer_model", model_file, type(self).__name__),)
        self.vocab_extra_ids = vocab_extra_ids
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.files[0]))
        self._vocab = {self._sp.id_to_piece(i): i for i in range(len(self._sp))}
        self._setup()

    def _piece(self, piece_id: int, fallback: str) -> str:
        return self._sp.id_to_piece(piece_id) if 0 <= piece_id < len(self._sp) else fallback

    def _add_special(self, token: str) -> int:
        token_id = self._vocab.setdefault(token, len(self._vocab))
        self._special_ids[token] = token_id
        return token_id

    def _setup(self) -> None:
        self._special_ids: dict[str, int] = {}
        self.cls, self.sep, self._eod, self.mask = (self._add_special(t) for t in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"))
        self._pad = self._add_special(self._piece(self._sp.pad_id(), "<PAD>"))
        self._bos = self._add_special(self._piece(self._sp.bos_id(), "<BOS>"))
        self.eos = self._add_special(self._piece(self._sp.eos_id(), "<EOS>"))
        for i in range(self.vocab_extra_ids):
            self._add_special(f"<extra_id_{i}>")
        self._id_to_special = {v: k for k, v in self._special_ids.items()}
        self._split = re.compile("|".join(re.escape(t) for t in self._special_ids))

    @property
    def vocab_size(self) -> int:
        """The model's pieces plus the special tokens appended."""
        return len(self._vocab)

    @property
    def eod(self) -> int:
        """End-of-document id."""
        return self._eod

    @property
    def pad(self) -> int:
        """Padding id."""
        return self._pad

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id."""
        return self._bos

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What makes dataset caches built with this tokenizer distinct."""
        return OrderedDict(**super().unique_identifiers, vocab_extra_ids=str(self.vocab_extra_ids))

    def tokenize(self, text: str) -> list[int]:
        """Pieces of the text between special tokens, each special token as its own id."""
        ids: list[int] = []
        start = 0
        for match in self._split.finditer(text):
            ids += self._sp.encode_as_ids(text[start : match.start()])
            ids.append(self._special_ids[match.group()])
            start = match.end()
        return ids + self._sp.encode_as_ids(text[start:])

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ids; each special token is written with a space either side."""
        text, run = "", []
        for token_id in ids:
            if token_id in self._id_to_special:
                text += self._sp.decode_ids(run) + " " + self._id_to_special[token_id] + " "
                run = []
            else:
                run.append(token_id)
        return text + self._sp.decode_ids(run)


class GPTSentencePieceTokenizer(SentencePieceTokenizer):
    """A SentencePiece model as it is: no tokens appended, eod = eos, pad = the model's pad id."""

    def __init__(self, model_file: str) -> None:
        super().__init__(model_file, vocab_extra_ids=0)

    def _setup(self) -> None:
        self._pad, self._bos, self.eos = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
        self._eod = self.eos
        self.cls = self.sep = self.mask = -1

    def tokenize(self, text: str) -> list[int]:
        """The model's pieces of `text`."""
        return self._sp.encode_as_ids(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ids."""
        return self._sp.decode_ids(list(ids))


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Llama 2's SentencePiece model: every text starts with bos; eod = eos; no pad token."""

    @property
    def pad(self) -> int:
        """None: GPTDataset uses its own padding id."""
        raise AttributeError("Llama2Tokenizer has no pad token")

    def tokenize(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """bos, the pieces of `text`, and eos when asked."""
        ids = self._sp.encode_as_ids(text)
        return ([self._bos] if bos else []) + ids + ([self.eos] if eos else [])


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


def missing_arguments(args: argparse.Namespace) -> list[str]:
    """The tokenizer arguments `args.tokenizer_type` needs but that are not set (torch-free)."""
    needs = REQUIRED_FILES.get(args.tokenizer_type, ())
    missing = [name for name in needs if not getattr(args, name, None)]
    if args.tokenizer_type == "NullTokenizer" and getattr(args, "vocab_size", None) is None:
        missing.append("vocab_size")
    return missing


def build_tokenizer(args: argparse.Namespace):
    """The tokenizer `--tokenizer-type` names (with its files from the other tokenizer arguments)."""
    kind = args.tokenizer_type
    builders = {
        "HuggingFaceTokenizer": lambda: HFTokenizer(args.tokenizer_model),
        "NullTokenizer": lambda: NullTokenizer(args.vocab_size),
        "GPT2BPETokenizer": lambda: GPT2BPETokenizer(args.vocab_file, args.merge_file),
        "AquilaTokenizerFS": lambda: AquilaTokenizerFS(args.vocab_file, args.merge_file, args.special_tokens_file),
        "SentencePieceTokenizer": lambda: SentencePieceTokenizer(
            args.tokenizer_model, getattr(args, "vocab_extra_ids", 0) or 0
        ),
        "GPTSentencePieceTokenizer": lambda: GPTSentencePieceTokenizer(args.tokenizer_model),
        "Llama2Tokenizer": lambda: Llama2Tokenizer(args.tokenizer_model),
        "HFTokenizerFS": lambda: HFTokenizerFS(args.tokenizer_path),
        "Llama3TokenizerFS": lambda: Llama3TokenizerFS(args.tokenizer_path),
        "QwenTokenizerFS": lambda: QwenTokenizerFS(args.tokenizer_path),
        "HFTokenizersTokenizerFS": lambda: HFTokenizersTokenizerFS(args.tokenizer_path),
    }
    if kind not in TOKENIZER_TYPES:
        extra = " (install the sentencepiece package)" if kind in SENTENCEPIECE_TYPES else ""
        raise ConfigError(f"tokenizer_type {kind} is not implemented here{extra} "
                          f"(implemented: {', '.join(TOKENIZER_TYPES)})")
    return builders[kind]()


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron-LM's padding: round up to a multiple of divisible_by × TP."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def check_special_ids(tokenizer: TextTokenizer, vocab: int) -> None:
    """ConfigError when a special token the data uses has an id the embedding does not have (tokenizers whose
    vocab_size leaves out added tokens, as HFTokenizerFS/QwenTokenizerFS do, can place them past the padding)."""
    for role in ("eod", "pad"):
        try:
            token_id = getattr(tokenizer, role)
        except AttributeError:
            continue
        if token_id is not None and token_id >= vocab:
            raise ConfigError(
                f"{type(tokenizer).__name__}: its {role} id {token_id} is outside the model's vocabulary of {vocab} "
                f"(tokenizer vocab_size {tokenizer.vocab_size}, padded by make_vocab_size_divisible_by); use a "
                "tokenizer whose vocabulary includes its special tokens, or a larger make_vocab_size_divisible_by"
            )
