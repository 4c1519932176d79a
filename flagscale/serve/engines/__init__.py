"""Serving engines: one interface (`base.ServingEngine`), one module per engine, and this table naming them.

An engine module is imported only when a deployment names it, so a machine without llama.cpp or SGLang imports
nothing of theirs. Adding an engine: a module with a ServingEngine subclass, one line in ENGINES, an example and
tests (docs/serving.md, "Adding an engine").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from flagscale.exceptions import ConfigError

if TYPE_CHECKING:
    from flagscale.serve.engines.base import ServingEngine

ENGINES: dict[str, str] = {
    "vllm": "flagscale.serve.engines.vllm:VLLM",
    "llama_cpp": "flagscale.serve.engines.llama_cpp:LlamaCpp",
    "sglang": "flagscale.serve.engines.sglang:SGLang",
}
"""Engine name (a deployment's `engine`, experiment.task.backend) -> "module:class"."""


def engine_for(name: str, where: str = "engine") -> ServingEngine:
    """The engine registered under `name`; an unknown name is one line listing the known ones."""
    if name not in ENGINES:
        raise ConfigError(f"{where} '{name}' is not a serving engine FlagScale knows (known: {', '.join(ENGINES)})")
    module_name, _, class_name = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)()


def register(name: str, target: str) -> None:
    """Register an engine class ("module:class") under `name` (a plug-in, or a test's own engine)."""
    ENGINES[name] = target
