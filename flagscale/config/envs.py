"""Env layering: `envs` -> `device_type_specific[type]` -> `node_specific[host]`, later wins."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flagscale.exceptions import ConfigError

_LAYER_KEYS = ("device_type_specific", "node_specific")


def layered_env(envs: Mapping[str, Any], host_type: str | None, host_name: str) -> dict[str, str]:
    """Environment for one host: the common layer, then its type's, then its own."""
    env = {k: _env_value(k, v) for k, v in envs.items() if k not in _LAYER_KEYS}
    by_type = envs.get("device_type_specific") or {}
    by_node = envs.get("node_specific") or {}
    if host_type is not None:
        env.update({k: _env_value(k, v) for k, v in (by_type.get(host_type) or {}).items()})
    env.update({k: _env_value(k, v) for k, v in (by_node.get(host_name) or {}).items()})
    return env


def _env_value(key: str, value: Any) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key)):
        raise ConfigError(f"experiment.envs: '{key}' is not a valid environment variable name")
    if isinstance(value, (Mapping, list, tuple)):
        raise ConfigError(f"experiment.envs.{key} must be a scalar, got a {type(value).__name__}")
    if isinstance(value, bool):
        return "1" if value else "0"
    return "" if value is None else str(value)
