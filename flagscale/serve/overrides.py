"""`flagscale serve` options as Hydra overrides of the first deployment's engine_args.

    --model-path P            ++serve.0.engine_args.model='P'
    --port N                  ++serve.0.engine_args.port=N
    --engine-args '{"max_num_seqs": 8, "compilation_config": {"level": 0}}'
                              ++serve.0.engine_args.max_num_seqs=8
                              ++serve.0.engine_args.compilation_config='{"level": 0}'

Overrides (not edits of the composed config) keep the printed stop/query commands reproducible.
A JSON object value is passed as a JSON string: that is how vLLM's JSON-valued options take it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from flagscale.exceptions import ConfigError

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def hydra_value(value: Any) -> str:
    """A Python value in Hydra's override grammar (strings always quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return hydra_value(json.dumps(value))
    return _quote(str(value))


def _quote(text: str) -> str:
    """Single-quote for Hydra: backslashes are literal except before a quote (and the closing one)."""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return f"'{text}'"


def parse_engine_args(text: str | None) -> dict[str, Any]:
    """--engine-args: a JSON object of vLLM argument names (dashes or underscores)."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--engine-args is not valid JSON ({err.msg} at column {err.colno}): {text}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--engine-args must be a JSON object like '{{\"max_num_seqs\": 8}}', got {text}")
    args = {}
    for key, value in data.items():
        name = str(key).removeprefix("--").replace("-", "_")
        if not _KEY.fullmatch(name):
            raise ConfigError(f"--engine-args: '{key}' is not a vLLM argument name")
        args[name] = value
    return args


def serve_overrides(model_path: str | None, port: int | None, engine_args: str | None,
                    index: int = 0) -> list[str]:
    """The Hydra overrides for the options given (none for options left out)."""
    values = parse_engine_args(engine_args)
    if model_path is not None:
        values["model"] = model_path
    if port is not None:
        values["port"] = port
    return [f"++serve.{index}.engine_args.{key}={hydra_value(value)}" for key, value in values.items()]
