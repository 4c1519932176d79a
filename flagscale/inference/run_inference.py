"""The offline inference program the inference runner starts on the host: vLLM's `LLM` over a batch.

    python -m flagscale.inference.run_inference --config-json '{"llm": {...}, "sampling": {...},
        "prompts": [...], "prompts_file": null, "output_path": "out.jsonl"}'

`llm` are `vllm.LLM(...)` arguments and `sampling` are `vllm.SamplingParams(...)` fields, by their
vLLM names. Prompts come from the list, or from a file (one per line, or JSONL with a "prompt" field).
Each result is one JSONL line: prompt, text, token_ids, finish_reason. A bad argument is one line
on stderr naming it (vLLM's own message) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class InferenceError(Exception):
    """A config the program cannot run; the message names the key."""


@dataclass(slots=True, kw_only=True)
class InferenceConfig:
    """The `inference` section of the task YAML (the runner checks it and fills output_path)."""

    llm: dict[str, Any]
    """vllm.LLM(...) arguments by their names (model, dtype, max_model_len, tensor_parallel_size, ...)."""
    sampling: dict[str, Any] = field(default_factory=dict)
    """vllm.SamplingParams fields by their names (temperature, top_p, max_tokens, seed, ...)."""
    prompts: list[str] = field(default_factory=list)
    """Prompts given in the YAML."""
    prompts_file: str | None = None
    """A file of prompts: one per line, or JSONL with a "prompt" field (added after `prompts`)."""
    output_path: str | None = None
    """The JSONL to write (default: <exp_dir>/outputs/<run id>.jsonl)."""


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; a JSONL file (every line an object) gives each line's "prompt"."""
    if not path.is_file():
        raise InferenceError(f"prompts_file {path} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and all(line.lstrip().startswith("{") for line in lines):
        try:
            return [str(json.loads(line)["prompt"]) for line in lines]
        except (json.JSONDecodeError, KeyError) as err:
            raise InferenceError(f"prompts_file {path}: each JSONL line needs a \"prompt\" ({err})") from None
    return lines


def prompts_of(config: InferenceConfig) -> list[str]:
    """The YAML's prompts, then the file's."""
    prompts = list(config.prompts)
    if config.prompts_file:
        prompts += read_prompts_file(Path(config.prompts_file))
    if not prompts:
        raise InferenceError("no prompts: set inference.prompts or inference.prompts_file")
    return prompts


def build_engine(config: InferenceConfig):
    """vLLM's LLM and SamplingParams from the config (vLLM validates the names)."""
    from vllm import LLM, SamplingParams

    try:
        params = SamplingParams(**config.sampling)
    except (TypeError, ValueError) as err:
        raise InferenceError(f"inference.sampling: {err}") from None
    try:
        llm = LLM(**config.llm)
    except TypeError as err:
        raise InferenceError(f"inference.llm: {err} (keys are vllm.LLM / EngineArgs argument names)") from None
    return llm, params


def write_results(path: Path, prompts: list[str], outputs: list) -> None:
    """One JSON object per prompt and completion."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for prompt, output in zip(prompts, outputs):
            for completion in output.outputs:
                record = {"prompt": prompt, "text": completion.text, "token_ids": list(completion.token_ids),
                          "finish_reason": completion.finish_reason}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def run(config: InferenceConfig) -> None:
    """Generate for every prompt and write the JSONL."""
    prompts = prompts_of(config)
    start = time.perf_counter()
    llm, params = build_engine(config)
    print(f"engine ready in {time.perf_counter() - start:.1f}s; generating for {len(prompts)} prompt(s)", flush=True)
    tick = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - tick
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    write_results(Path(config.output_path or "outputs.jsonl"), prompts, outputs)
    for prompt, output in zip(prompts, outputs):
        print(f"{prompt!r} -> {output.outputs[0].text!r}", flush=True)
    print(f"wrote {config.output_path}: {len(prompts)} prompt(s), {tokens} tokens in {seconds:.2f}s "
          f"({tokens / max(seconds, 1e-9):,.0f} tokens/s)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-json", required=True, help="The inference config as one JSON object.")
    args = parser.parse_args(argv)
    try:
        config = InferenceConfig(**json.loads(args.config_json))
    except (json.JSONDecodeError, TypeError) as err:
        print(f"error: --config-json: {err}", file=sys.stderr, flush=True)
        return 2
    try:
        run(config)
    except InferenceError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
