"""The one rule set that turns a nested config group into engine command-line arguments.

`True` -> bare flag, `False`/`None` -> omitted, list -> repeated values after one flag,
nested group names dropped (only leaves name arguments), a leaf name seen twice -> error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flagscale.exceptions import ConfigError


def option_name(key: str) -> str:
    """`tensor_model_parallel_size` -> `--tensor-model-parallel-size`."""
    return "--" + key.replace("_", "-")


def flatten_leaves(group: Mapping[str, Any], prefix: str) -> dict[str, tuple[str, Any]]:
    """Leaf name -> (dotted path, value) of a nested group; a leaf name used twice is an error."""
    leaves: dict[str, tuple[str, Any]] = {}
    for key, value in group.items():
        path = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            nested = flatten_leaves(value, path)
            for name, item in nested.items():
                _add_leaf(leaves, name, item)
        else:
            _add_leaf(leaves, str(key), (path, value))
    return leaves


def _add_leaf(leaves: dict[str, tuple[str, Any]], name: str, item: tuple[str, Any]) -> None:
    if name in leaves:
        raise ConfigError(
            f"'{name}' is set twice ({leaves[name][0]} and {item[0]}); "
            "group names are dropped when arguments are built, so keep one"
        )
    leaves[name] = item


def to_argv(leaves: Mapping[str, tuple[str, Any]]) -> list[str]:
    """Render leaves as command-line arguments following the module's rules."""
    argv: list[str] = []
    for name, (_, value) in leaves.items():
        if value is None or value is False:
            continue
        argv.append(option_name(name))
        if value is True:
            continue
        if isinstance(value, (list, tuple)):
            argv.extend(_scalar(v, name) for v in value)
        else:
            argv.append(_scalar(value, name))
    return argv


def _scalar(value: Any, name: str) -> str:
    if isinstance(value, (Mapping, list, tuple)):
        raise ConfigError(f"'{name}' holds a nested {type(value).__name__}; arguments take scalars or one list")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
