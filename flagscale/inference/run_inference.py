"""The offline inference program the inference runner starts on the host: vLLM's `LLM` over a batch.

    python -m flagscale.inference.run_inference --config-json '{"llm": {...}, "generate": {...}}'

The config is the `inference` section of the task YAML, in upstream FlagScale's shape:

    llm:                      # vllm.LLM(...) arguments (EngineArgs fields), by vLLM's names; model is required
      model: outputs/tiny_gpt/hf
    generate:
      prompts: [...]          # a list, or one string
      prompts_file: p.jsonl   # one prompt per line, or JSONL with a "prompt" field (after `prompts`)
      messages: [...]         # chat conversations ([{role, content}, ...]) sent through LLM.chat
      chat_template: ...      # Jinja text or a file, for `messages` (default: the tokenizer's)
      sampling: {...}         # vllm.SamplingParams fields, by vLLM's names
    output_path: out.jsonl    # default: <exp_dir>/outputs/<run id>.jsonl (filled in by the runner)

Each completion is one JSONL line: prompt, text, token_ids, finish_reason (and messages for a chat).
Names vLLM does not know are one line naming the key and the closest known name; so are upstream keys
for things this project does not run (multimodal inputs, Emu3 image generation, diffusion engines).
A bad config or argument ends the program with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagscale.config.schema import build, unknown_key_message
from flagscale.exceptions import ConfigError

SECTION = "inference"
PROMPT_SOURCES = "inference.generate.prompts (a list), inference.generate.prompts_file or inference.generate.messages"

_TEXT_INPUTS = "text prompts (generate.prompts, generate.prompts_file) and chat messages (generate.messages)"
_EMU = ("Emu3/Emu3.5 image generation and understanding, which needs a patched vLLM", _TEXT_INPUTS)
_MULTIMODAL = ("multimodal inputs: images, video", _TEXT_INPUTS)
_EMU_SAMPLING = ("Emu3/Emu3.5 guidance and per-modality sampling, which needs a patched vLLM",
                 "vllm.SamplingParams fields: temperature, top_p, top_k, max_tokens, seed, ...")
UNSUPPORTED: dict[str, tuple[str, str]] = {
    "engine": ("a diffusers/pi0 pipeline engine, for diffusion and embodied models",
               "vLLM's LLM for text generation: inference.llm and inference.generate"),
    "llm.vq_model": _EMU,
    "llm.save": ("Emu3.5's image output folder", "inference.output_path (JSONL results)"),
    "llm.processor": ("a Hugging Face processor for multimodal prompts", _TEXT_INPUTS),
    **{f"generate.{key}": _MULTIMODAL for key in ("images", "mm_data", "modality")},
    **{f"generate.{key}": _EMU for key in ("mode", "ratios", "ratio", "image_area", "task_type")},
    **{f"generate.sampling.{kind}{knob}": _EMU_SAMPLING
       for kind in ("text_", "image_") for knob in ("top_k", "top_p", "temperature")},
    "generate.sampling.guidance_scale": _EMU_SAMPLING,
}
"""Keys of upstream FlagScale's inference YAMLs that this project does not run: (what, what is supported)."""

MOVED = {"sampling": "generate.sampling", "prompts": "generate.prompts", "prompts_file": "generate.prompts_file"}
"""The earlier flat spelling of this project, and where each key lives now."""


class InferenceError(Exception):
    """A config that fails on the host (a missing prompts file, an argument vLLM refuses)."""


@dataclass(slots=True, kw_only=True)
class GenerateConfig:
    """`inference.generate`: what to generate from, and how to sample."""

    prompts: list[str] | str = field(default_factory=list)
    """Prompts given in the YAML (one string is one prompt)."""
    prompts_file: str | None = None
    """A file of prompts: one per line, or JSONL with a "prompt" field (added after `prompts`)."""
    messages: list[Any] = field(default_factory=list)
    """Chat conversations for LLM.chat: each a list of {role, content}; one conversation may be given bare."""
    chat_template: str | None = None
    """Jinja chat template for `messages`, as text or a file (default: the tokenizer's own)."""
    sampling: dict[str, Any] = field(default_factory=dict)
    """vllm.SamplingParams fields by their names (temperature, top_p, max_tokens, seed, ...)."""


@dataclass(slots=True, kw_only=True)
class InferenceConfig:
    """The `inference` section of the task YAML."""

    llm: dict[str, Any]
    """vllm.LLM(...) arguments by their names (model, dtype, max_model_len, tensor_parallel_size, ...)."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    output_path: str | None = None
    """The JSONL to write (the runner fills in <exp_dir>/outputs/<run id>.jsonl when unset)."""

    @property
    def prompts(self) -> list[str]:
        """The YAML's prompts (the file's are read on the host)."""
        prompts = self.generate.prompts
        return [prompts] if isinstance(prompts, str) else list(prompts)

    @property
    def conversations(self) -> list[list[dict[str, Any]]]:
        messages = self.generate.messages
        return [messages] if messages and isinstance(messages[0], Mapping) else list(messages)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


def parse_config(data: Any, path: str = SECTION) -> InferenceConfig:
    """The inference section as a config; a wrong, moved or unsupported key is one ConfigError naming it."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"the '{path}' section must be a mapping with llm (vllm.LLM arguments) and generate "
                          "(prompts, sampling)")
    for old, new in MOVED.items():
        if old in data:
            raise ConfigError(f"{path}.{old} is now {path}.{new} (upstream FlagScale's layout); move it under "
                              f"{path}.generate")
    refuse_unsupported(data, path)
    if not isinstance(data.get("llm"), Mapping) or not data["llm"]:
        raise ConfigError(f"{path}.llm is required: the vllm.LLM arguments, at least {path}.llm.model "
                          "(a Hugging Face model folder or hub id)")
    config = build(InferenceConfig, data, path)
    _check_prompts(config.prompts, f"{path}.generate.prompts")
    _check_conversations(config.conversations, f"{path}.generate.messages")
    return config


def refuse_unsupported(data: Mapping[str, Any], path: str = SECTION) -> None:
    """Upstream keys for things this project does not run: one line naming the key and what is supported."""
    for dotted, (what, supported) in UNSUPPORTED.items():
        node: Any = data
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            raise ConfigError(f"{path}.{dotted}: not supported here ({what}); supported: {supported}")


def _check_prompts(prompts: list[Any], where: str) -> None:
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ConfigError(f"{where}[{index}] must be a string, got {prompt!r}")


def _check_conversations(conversations: list[Any], where: str) -> None:
    for number, conversation in enumerate(conversations):
        if not isinstance(conversation, list) or not conversation:
            raise ConfigError(f"{where}[{number}] must be a list of messages ({{role: user, content: ...}})")
        for message in conversation:
            if not isinstance(message, Mapping) or not {"role", "content"} <= set(message):
                raise ConfigError(f"{where}[{number}]: each message needs a role and a content, got {message!r}")


@dataclass(frozen=True, slots=True)
class VllmNames:
    """The argument names vLLM accepts: vllm.LLM(...) (its own and EngineArgs fields), SamplingParams fields."""

    llm: frozenset[str]
    sampling: frozenset[str]

    @classmethod
    def from_source(cls) -> VllmNames | None:
        """Read from the installed vLLM's source without importing it (an import takes seconds);
        None when vLLM is not installed here or its classes are not where this reader expects them."""
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = Path(next(iter(spec.submodule_search_locations)))
        engine = _class_node(root / "engine" / "arg_utils.py", "EngineArgs")
        llm = _class_node(root / "entrypoints" / "llm.py", "LLM")
        sampling = _class_node(root / "sampling_params.py", "SamplingParams")
        if engine is None or llm is None or sampling is None:
            return None
        names = cls(llm=frozenset(_annotated(engine) | _init_args(llm)), sampling=frozenset(_annotated(sampling)))
        return names if {"model", "dtype"} <= names.llm and {"temperature", "max_tokens"} <= names.sampling else None

    @classmethod
    def from_classes(cls) -> VllmNames:
        """From the imported classes (on the host, where vLLM is imported anyway)."""
        import inspect

        from vllm import LLM, SamplingParams
        from vllm.engine.arg_utils import EngineArgs

        init = {name for name in inspect.signature(LLM.__init__).parameters if name not in ("self", "kwargs")}
        engine = {f.name for f in dataclasses.fields(EngineArgs)}
        sampling = getattr(SamplingParams, "__struct_fields__", None) or inspect.signature(SamplingParams).parameters
        return cls(llm=_public(init | engine), sampling=_public(sampling))

    def check(self, config: InferenceConfig, path: str = SECTION) -> None:
        """A name vLLM does not know is a ConfigError suggesting the closest one."""
        for section, given, known in (("llm", config.llm, self.llm),
                                      ("generate.sampling", config.generate.sampling, self.sampling)):
            for key in given:
                if key not in known:
                    raise ConfigError(unknown_key_message(f"{path}.{section}.{key}", key, sorted(known))
                                      + f" ({_VLLM_KIND[section]})")


def _public(names: Any) -> frozenset[str]:
    return frozenset(n for n in names if not n.startswith("_"))


_VLLM_KIND = {"llm": "vllm.LLM / EngineArgs arguments", "generate.sampling": "vllm.SamplingParams fields"}


def _class_node(path: Path, name: str) -> ast.ClassDef | None:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)


def _annotated(node: ast.ClassDef) -> set[str]:
    return {n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
            and not n.target.id.startswith("_")}


def _init_args(node: ast.ClassDef) -> set[str]:
    init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None:
        return set()
    return {a.arg for a in init.args.args + init.args.kwonlyargs} - {"self"}


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; a JSONL file (every line an object) gives each line's "prompt"."""
    if not path.is_file():
        raise InferenceError(f"inference.generate.prompts_file {path} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and all(line.lstrip().startswith("{") for line in lines):
        try:
            return [str(json.loads(line)["prompt"]) for line in lines]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InferenceError(f"inference.generate.prompts_file {path}: each JSONL line needs a \"prompt\" "
                                 f"({err!r})") from None
    return lines


def prompts_of(config: InferenceConfig) -> list[str]:
    """The YAML's prompts, then the file's."""
    prompts = config.prompts
    if config.generate.prompts_file:
        prompts += read_prompts_file(Path(config.generate.prompts_file))
    if not prompts and not config.conversations:
        raise InferenceError(f"no prompts: set {PROMPT_SOURCES}")
    return prompts


def chat_template_of(config: InferenceConfig) -> str | None:
    """generate.chat_template as text: a file's content, or the template itself."""
    template = config.generate.chat_template
    if template and "{" not in template and Path(template).expanduser().is_file():
        return Path(template).expanduser().read_text(encoding="utf-8")
    return template


def build_engine(config: InferenceConfig) -> tuple[Any, Any]:
    """vLLM's LLM and SamplingParams from the config (after checking the names against vLLM's own)."""
    from vllm import LLM, SamplingParams

    try:
        VllmNames.from_classes().check(config)
    except ConfigError as err:
        raise InferenceError(str(err)) from None
    try:
        params = SamplingParams(**config.generate.sampling)
    except (TypeError, ValueError) as err:
        raise InferenceError(f"inference.generate.sampling: {err}") from None
    try:
        llm = LLM(**config.llm)
    except TypeError as err:
        raise InferenceError(f"inference.llm: {err} (keys are vllm.LLM / EngineArgs argument names)") from None
    return llm, params


@dataclass(slots=True)
class Batch:
    """What was asked and what came back, in order: prompts first, then chat conversations."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)

    def add(self, requests: list[dict[str, Any]], outputs: list[Any]) -> None:
        self.requests += requests
        self.outputs += outputs

    @property
    def tokens(self) -> int:
        return sum(len(c.token_ids) for o in self.outputs for c in o.outputs)


def generate(llm: Any, params: Any, config: InferenceConfig, prompts: list[str]) -> Batch:
    """LLM.generate over the prompts, LLM.chat over the conversations."""
    batch = Batch()
    if prompts:
        batch.add([{"prompt": p} for p in prompts], llm.generate(prompts, params))
    conversations = config.conversations
    if conversations:
        try:
            outputs = llm.chat(conversations, params, chat_template=chat_template_of(config))
        except ValueError as err:
            raise InferenceError(f"inference.generate.messages: {str(err).splitlines()[0]} (set "
                                 "inference.generate.chat_template to a Jinja template or a file)") from None
        batch.add([{"messages": c, "prompt": o.prompt} for c, o in zip(conversations, outputs)], outputs)
    return batch


def write_results(path: Path, batch: Batch) -> None:
    """One JSON object per request and completion."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for request, output in zip(batch.requests, batch.outputs):
            for completion in output.outputs:
                record = {**request, "text": completion.text, "token_ids": list(completion.token_ids),
                          "finish_reason": completion.finish_reason}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def run(config: InferenceConfig) -> None:
    """Generate for every prompt and conversation, and write the JSONL."""
    prompts = prompts_of(config)
    start = time.perf_counter()
    llm, params = build_engine(config)
    count = len(prompts) + len(config.conversations)
    print(f"engine ready in {time.perf_counter() - start:.1f}s; generating for {count} request(s)", flush=True)
    tick = time.perf_counter()
    batch = generate(llm, params, config, prompts)
    seconds = time.perf_counter() - tick
    output_path = Path(config.output_path or "outputs.jsonl")
    write_results(output_path, batch)
    for request, output in zip(batch.requests, batch.outputs):
        print(f"{request['prompt']!r} -> {output.outputs[0].text!r}", flush=True)
    print(f"wrote {output_path}: {count} request(s), {batch.tokens} tokens in {seconds:.2f}s "
          f"({batch.tokens / max(seconds, 1e-9):,.0f} tokens/s)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-json", required=True, help="The inference section as one JSON object.")
    args = parser.parse_args(argv)
    try:
        config = parse_config(json.loads(args.config_json))
        run(config)
    except json.JSONDecodeError as err:
        print(f"error: --config-json: {err}", file=sys.stderr, flush=True)
        return 2
    except (ConfigError, InferenceError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
