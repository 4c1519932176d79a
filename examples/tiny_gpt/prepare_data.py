"""Create everything the tiny GPT example trains on, offline and deterministically.

    python examples/tiny_gpt/prepare_data.py            # -> data/tiny_gpt/ in the repo root

Generates two English-like corpora from a small seeded grammar (short stories, and arithmetic and
world facts; ~2.5 MB together), trains a byte-level BPE tokenizer on them (Hugging Face folder),
and tokenizes each corpus into Megatron .bin/.idx files, so both a single source and a blend
(`--data-path 0.7 <dir>/stories_text_document 0.3 <dir>/facts_text_document`) can be trained.
The same tokenizer is also written in the two other shapes upstream's YAMLs load, each with the
corpora tokenized by that tokenizer type: GPT-2-style files for AquilaTokenizerFS (<dir>/gpt2_files:
vocab.json, merges.txt, special_tokens.txt), and a folder with Qwen's special tokens added for
QwenTokenizerFS (<dir>/qwen_tokenizer).
A second run with the same options finds manifest.json up to date and does nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run by path: make `tools` and `flagscale` importable
    sys.path.insert(0, str(REPO_ROOT))

from tokenizers import Tokenizer  # noqa: E402

from tools.datasets import preprocess_data, train_tokenizer  # noqa: E402

GENERATOR_VERSION = 4
QWEN_SPECIALS = ("<|endoftext|>", "<|extra_203|>", "<|extra_204|>")  # QwenTokenizerFS: pad, cls, eod
NAMES = ["Tom", "Lily", "Max", "Mia", "Ben", "Sara", "Leo", "Anna", "Sam", "Zoe", "Tim", "Emma", "Jack", "Lucy"]
ANIMALS = ["cat", "dog", "rabbit", "bird", "fox", "bear", "mouse", "duck", "frog", "horse", "owl", "lion"]
PLACES = ["small house", "big forest", "quiet village", "green garden", "busy town", "little farm", "sunny beach"]
LANDMARKS = ["river", "hill", "lake", "bridge", "school", "park", "mountain", "market"]
ACTIVITIES = ["play with a red ball", "sing a happy song", "look at the clouds", "run in the grass",
              "read a short book", "pick some flowers", "jump over the puddles", "draw pictures"]
OBJECTS = ["shiny key", "blue box", "tiny boat", "golden coin", "soft blanket", "old map", "big apple", "toy car"]
SPOTS = ["a tall tree", "a wet rock", "the bed", "a pile of leaves", "the table", "a wooden fence"]
FEELINGS = ["happy", "surprised", "curious", "excited", "proud", "sad", "scared"]
ADJECTIVES = ["kind", "funny", "clever", "brave", "gentle", "quiet", "friendly"]
TOGETHER = ["went on a long walk", "built a little house", "shared a tasty lunch", "played until the sun went down",
            "looked for the owner", "told stories by the fire", "cleaned the whole garden"]
MORALS = ["sharing makes everyone happy", "friends help each other", "it is good to be kind",
          "being brave is important", "hard work pays off", "it is fun to try new things"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "night": "dark", "apple": "red",
          "banana": "yellow", "sea": "blue", "coal": "black", "orange": "orange"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def story(rng: random.Random) -> str:
    """One short story from the grammar."""
    name, friend = rng.sample(NAMES, 2)
    animal, friend_animal = rng.sample(ANIMALS, 2)
    pronoun = rng.choice(["He", "She"])
    obj, feeling = rng.choice(OBJECTS), rng.choice(FEELINGS)
    sentences = [
        f"Once upon a time, there was a little {animal} named {name}.",
        f"{pronoun} lived in a {rng.choice(PLACES)} near the {rng.choice(LANDMARKS)}.",
        f"Every morning, {name} liked to {rng.choice(ACTIVITIES)}.",
        f"One day, {name} found a {obj} under {rng.choice(SPOTS)}.",
        f"{name} was very {feeling}.",
        f"{name} showed the {obj} to {friend}, the {rng.choice(ADJECTIVES)} {friend_animal}.",
        f"Together they {rng.choice(TOGETHER)}.",
        f"In the end, {name} learned that {rng.choice(MORALS)}.",
    ]
    return " ".join(sentences)


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    if rng.random() < 0.5:
        return f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}."
    big, small = max(a, b), min(a, b)
    return f"{big} minus {small} equals {big - small}."


def _multiplication(rng: random.Random) -> str:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"{a} times {b} is {a * b}."


def _comparison(rng: random.Random) -> str:
    a, b = rng.sample(range(21), 2)
    word = "bigger" if a > b else "smaller"
    return f"{NUMBER_WORDS[a].capitalize()} is {word} than {NUMBER_WORDS[b]}."


def _color(rng: random.Random) -> str:
    thing = rng.choice(sorted(COLORS))
    return f"The color of the {thing} is {COLORS[thing]}."


def _sequence(rng: random.Random) -> str:
    names = rng.choice([DAYS, MONTHS])
    i = rng.randrange(len(names))
    return f"After {names[i]} comes {names[(i + 1) % len(names)]}."


def _counting(rng: random.Random) -> str:
    start = rng.randint(1, 15)
    return "Counting: " + ", ".join(NUMBER_WORDS[start : start + 5]) + "."


FACTS: tuple[Callable[[random.Random], str], ...] = (
    _arithmetic, _multiplication, _comparison, _color, _sequence, _counting,
)


def facts(rng: random.Random) -> str:
    """One paragraph of eight facts."""
    return " ".join(rng.choice(FACTS)(rng) for _ in range(8))


def write_corpus(path: Path, make: Callable[[random.Random], str], seed: int, target_bytes: int) -> int:
    """Write JSONL documents until the file reaches target_bytes; return the document count."""
    rng, written, count = random.Random(seed), 0, 0
    with path.open("w", encoding="utf-8") as handle:
        while written < target_bytes:
            line = json.dumps({"text": make(rng)}) + "\n"
            handle.write(line)
            written, count = written + len(line), count + 1
    return count


def _plain_text(jsonl: Path, out: Path) -> None:
    with jsonl.open(encoding="utf-8") as src, out.open("a", encoding="utf-8") as dst:
        for line in src:
            dst.write(json.loads(line)["text"] + "\n")


def build(out: Path, options: dict) -> list[Path]:
    """Corpora, tokenizer and indexed files under `out`; return the files written."""
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    sources = {"stories": (story, options["stories_bytes"]), "facts": (facts, options["facts_bytes"])}
    written: list[Path] = []
    tokenizer_text = corpus / "tokenizer_train.txt"
    tokenizer_text.unlink(missing_ok=True)
    for index, (name, (make, size)) in enumerate(sources.items()):
        path = corpus / f"{name}.jsonl"
        count = write_corpus(path, make, options["seed"] + index, size)
        print(f"wrote {path} ({count} documents, {path.stat().st_size / 1e6:.2f} MB)")
        _plain_text(path, tokenizer_text)
        written.append(path)
    tokenizer = train_tokenizer.train_bpe([tokenizer_text], options["vocab_size"])
    written += train_tokenizer.save_hf_folder(tokenizer, out / "tokenizer", model_max_length=2048)
    print(f"wrote {out / 'tokenizer'} (vocab {tokenizer.get_vocab_size()})")
    for name in sources:
        argv = ["--input", str(corpus / f"{name}.jsonl"), "--json-keys", "text", "--append-eod",
                "--tokenizer-model", str(out / "tokenizer"), "--output-prefix", str(out / name)]
        for prefix in preprocess_data.main(argv):
            written += [Path(prefix + ".bin"), Path(prefix + ".idx")]
    files = train_tokenizer.save_gpt2_files(tokenizer, out / "gpt2_files")
    written += files
    qwen = Tokenizer.from_str(tokenizer.to_str())
    qwen.add_special_tokens(list(QWEN_SPECIALS))
    written += train_tokenizer.save_hf_folder(qwen, out / "qwen_tokenizer", model_max_length=2048)
    print(f"wrote {out / 'gpt2_files'} (vocab.json, merges.txt, special_tokens.txt) and {out / 'qwen_tokenizer'}")
    variants = {
        "gpt2_files": ["--tokenizer-type", "AquilaTokenizerFS", "--vocab-file", str(files[0]),
                       "--merge-file", str(files[1]), "--special-tokens-file", str(files[2])],
        "qwen_tokenizer": ["--tokenizer-type", "QwenTokenizerFS", "--tokenizer-path", str(out / "qwen_tokenizer")],
    }  # fmt: skip
    for folder, tokenizer_args in variants.items():
        for name in sources:
            argv = ["--input", str(corpus / f"{name}.jsonl"), "--json-keys", "text", "--append-eod",
                    *tokenizer_args, "--output-prefix", str(out / folder / name)]
            for prefix in preprocess_data.main(argv):
                written += [Path(prefix + ".bin"), Path(prefix + ".idx")]
    return written


def _up_to_date(manifest: Path, options: dict) -> bool:
    if not manifest.is_file():
        return False
    recorded = json.loads(manifest.read_text(encoding="utf-8"))
    return recorded.get("options") == options and all(Path(p).is_file() for p in recorded.get("files", []))


def main(argv: Sequence[str] | None = None) -> Path:
    """Prepare the data (unless up to date); return the output folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "data" / "tiny_gpt")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--stories-bytes", type=int, default=1_600_000, help="Size of the stories corpus.")
    parser.add_argument("--facts-bytes", type=int, default=900_000, help="Size of the facts corpus.")
    parser.add_argument("--force", action="store_true", help="Rebuild even when manifest.json is up to date.")
    args = parser.parse_args(argv)
    out = args.output_dir.resolve()
    options = {"version": GENERATOR_VERSION, "seed": args.seed, "vocab_size": args.vocab_size,
               "stories_bytes": args.stories_bytes, "facts_bytes": args.facts_bytes}
    manifest = out / "manifest.json"
    if not args.force and _up_to_date(manifest, options):
        print(f"{out} is up to date ({manifest}); pass --force to rebuild")
        return out
    start = time.perf_counter()
    files = build(out, options)
    manifest.write_text(json.dumps({"options": options, "files": [str(f) for f in files]}, indent=2) + "\n")
    print(f"prepared {out} in {time.perf_counter() - start:.1f}s")
    print(f"train with: --tokenizer-model {out / 'tokenizer'} --data-path 0.7 {out / 'stories_text_document'} "
          f"0.3 {out / 'facts_text_document'}")
    return out


if __name__ == "__main__":
    main()
