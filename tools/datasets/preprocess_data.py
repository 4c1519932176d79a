"""Tokenize text or JSONL into Megatron's indexed format (.bin/.idx) with Megatron-Core's builder.

    python tools/datasets/preprocess_data.py --input corpus.jsonl --json-keys text \
        --tokenizer-model data/tok --output-prefix data/corpus --append-eod
    python tools/datasets/preprocess_data.py --input corpus.jsonl --tokenizer-type GPT2BPETokenizer \
        --vocab-file vocab.json --merge-file merges.txt --output-prefix data/corpus --append-eod

Every text tokenizer of the training program can be used, with the training's own arguments
(`--tokenizer-type` and its files: `--tokenizer-model`, `--vocab-file`/`--merge-file`,
`--special-tokens-file`, `--tokenizer-path`, `--vocab-extra-ids`), so the ids match training.

Writes `<output-prefix>_<key>_document.bin/.idx` per JSON key (Megatron-LM's naming), so the
training `--data-path` is `<output-prefix>_text_document`. A plain-text input (any name not ending
in .json/.jsonl) holds one document per blank-line-separated paragraph.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run by path: make `flagscale` and `tools` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flagscale.exceptions import ConfigError
from flagscale.train.tokenizer import TEXT_TOKENIZER_TYPES, TextTokenizer, build_tokenizer, missing_arguments

BATCH_DOCUMENTS = 1000


def read_documents(path: Path, key: str, input_format: str) -> Iterator[str]:
    """Documents of one input: JSONL field `key`, or blank-line-separated paragraphs of text."""
    is_json = input_format == "jsonl" or (input_format == "auto" and path.suffix in (".json", ".jsonl"))
    with path.open(encoding="utf-8") as handle:
        if is_json:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    yield _json_field(line, key, path, number)
            return
        paragraph: list[str] = []
        for line in handle:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).rstrip("\n")
                paragraph = []
        if paragraph:
            yield "".join(paragraph).rstrip("\n")


def _json_field(line: str, key: str, path: Path, number: int) -> str:
    try:
        value = json.loads(line)[key]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}:{number}: cannot read JSON key '{key}': {err}") from err
    return str(value)


def _batches(documents: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for document in documents:
        batch.append(document)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_indexed(documents: Iterator[str], tokenizer: TextTokenizer, prefix: str, append_eod: bool) -> tuple[int, int]:
    """Tokenize documents into prefix.bin/.idx; return (documents, tokens) written."""
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    n_docs = n_tokens = 0
    for batch in _batches(documents, BATCH_DOCUMENTS):
        for ids in tokenizer.tokenize_batch(batch):
            if append_eod:
                ids.append(tokenizer.eod)
            if not ids:
                continue
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            n_docs, n_tokens = n_docs + 1, n_tokens + len(ids)
    builder.finalize(f"{prefix}.idx")
    return n_docs, n_tokens


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (Megatron-LM's names)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path, help="JSONL (one object per line) or plain text.")
    parser.add_argument("--input-format", choices=("auto", "jsonl", "text"), default="auto")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields to tokenize.")
    parser.add_argument("--output-prefix", required=True, help="Output path prefix.")
    parser.add_argument("--tokenizer-type", choices=TEXT_TOKENIZER_TYPES, default="HuggingFaceTokenizer")
    parser.add_argument("--tokenizer-model", help="HuggingFaceTokenizer: a tokenizer folder; SentencePiece: a .model.")
    parser.add_argument("--tokenizer-path", help="*FS tokenizers: a tokenizer folder or tokenizer.json.")
    parser.add_argument("--vocab-file", help="GPT2BPETokenizer, AquilaTokenizerFS: vocab.json.")
    parser.add_argument("--merge-file", help="GPT2BPETokenizer, AquilaTokenizerFS: merges.txt.")
    parser.add_argument("--special-tokens-file", help="AquilaTokenizerFS: special tokens, one per line.")
    parser.add_argument("--vocab-extra-ids", type=int, default=0, help="SentencePieceTokenizer: <extra_id_N> tokens.")
    parser.add_argument("--append-eod", action="store_true", help="Append the eos token to every document.")
    parser.add_argument("--workers", type=int, default=1, help="Tokenizer threads.")
    return parser


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Preprocess; return the written prefixes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = missing_arguments(args)
    if missing:
        parser.error(f"--tokenizer-type {args.tokenizer_type} needs "
                     + " and ".join("--" + name.replace("_", "-") for name in missing))
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, args.workers)))
    try:
        tokenizer = build_tokenizer(args)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    Path(args.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    prefixes = []
    for key in args.json_keys:
        start, prefix = time.perf_counter(), f"{args.output_prefix}_{key}_document"
        docs, tokens = write_indexed(
            read_documents(args.input, key, args.input_format), tokenizer, prefix, args.append_eod
        )
        print(f"wrote {prefix}.bin/.idx: {docs} documents, {tokens} tokens in {time.perf_counter() - start:.1f}s")
        prefixes.append(prefix)
    return prefixes


if __name__ == "__main__":
    main()
