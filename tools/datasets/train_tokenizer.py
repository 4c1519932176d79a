"""Train a small byte-level BPE tokenizer and save it as a Hugging Face tokenizer folder.

    python tools/datasets/train_tokenizer.py --input corpus.txt --output-dir tok --vocab-size 1024
    python tools/datasets/train_tokenizer.py --input corpus.txt --output-dir tok --format gpt2-files

`--format gpt2-files` writes the same tokenizer as GPT-2-style files instead: vocab.json, merges.txt and
special_tokens.txt (one token per line), what GPT2BPETokenizer and AquilaTokenizerFS read.

Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json (bos `<s>`, eos `</s>`,
pad `<pad>`, unk `<unk>`, a simple chat template), loadable offline by the `tokenizers` library
and by `transformers.PreTrainedTokenizerFast`. No BOS/EOS is added on encode: training data gets an
EOS per document from preprocess_data.py, and served prompts then look like training text.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_bpe(files: Sequence[str | Path], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with the special tokens first (ids 0..3: unk, bos, eos, pad)."""
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(f) for f in files], trainer)
    return tokenizer


def save_hf_folder(tokenizer: Tokenizer, output_dir: Path, model_max_length: int) -> list[Path]:
    """Write the three files a Hugging Face tokenizer folder needs; return their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **SPECIAL_TOKENS,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    paths = [output_dir / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
    tokenizer.save(str(paths[0]))
    paths[1].write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    paths[2].write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n", encoding="utf-8")
    return paths


GPT2_FILE_SPECIALS = ("<|endoftext|>",)  # AquilaTokenizerFS pads with it; GPT2BPETokenizer's end of document


def save_gpt2_files(tokenizer: Tokenizer, output_dir: Path) -> list[Path]:
    """Write vocab.json, merges.txt and special_tokens.txt (the trained special tokens, then `<|endoftext|>`)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [Path(p) for p in tokenizer.model.save(str(output_dir))]
    specials = output_dir / "special_tokens.txt"
    specials.write_text("\n".join([*SPECIAL_TOKENS.values(), *GPT2_FILE_SPECIALS]) + "\n", encoding="utf-8")
    return [*written, specials]


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="Text files to train on.")
    parser.add_argument("--output-dir", required=True, type=Path, help="Tokenizer folder to write.")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--model-max-length", type=int, default=2048)
    parser.add_argument("--format", choices=("hf", "gpt2-files"), default="hf",
                        help="hf: a Hugging Face tokenizer folder; "
                        "gpt2-files: vocab.json, merges.txt, special_tokens.txt.")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Train and save."""
    args = build_parser().parse_args(argv)
    tokenizer = train_bpe(args.input, args.vocab_size)
    if args.format == "gpt2-files":
        written = save_gpt2_files(tokenizer, args.output_dir)
    else:
        written = save_hf_folder(tokenizer, args.output_dir, args.model_max_length)
    for path in written:
        print(f"wrote {path}")
    print(f"vocab size {tokenizer.get_vocab_size()}")


if __name__ == "__main__":
    main()
