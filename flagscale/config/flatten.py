"""The one rule set that turns a nested config group into engine command-line arguments.

`True` -> bare flag, `False`/`None` -> omitted, list -> repeated values after one flag,
nested group names dropped (only leaves name arguments), dashed spellings (`seq-length`) are the
same argument as underscored ones, and a leaf set twice follows argparse: the last one wins, and
the caller is told about both places.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flagscale.exceptions import ConfigError

Leaves = dict[str, tuple[str, Any]]
"""Argument name -> (dotted path where it was set, value)."""


def option_name(key: str) -> str:
    """`tensor_model_parallel_size` -> `--tensor-model-parallel-size`."""
    return "--" + key.replace("_", "-")


def leaf_name(key: str) -> str:
    """A YAML key as an argument name: `seq-length` and `--seq-length` are `seq_length`."""
    return str(key).lstrip("-").replace("-", "_")


def flatten_leaves(
    group: Mapping[str, Any], prefix: str, overridden: list[tuple[str, str, str]] | None = None
) -> Leaves:
    """Leaf name -> (dotted path, value) of a nested group, in argparse order (the last setting wins).

    Each leaf set more than once is reported in `overridden` as (name, earlier path, winning path).
    """
    leaves: Leaves = {}
    for key, value in group.items():
        path = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            nested = flatten_leaves(value, path, overridden)
        else:
            nested = {leaf_name(key): (path, value)}
        for name, item in nested.items():
            if name in leaves and overridden is not None:
                overridden.append((name, leaves[name][0], item[0]))
            leaves.pop(name, None)
            leaves[name] = item
    return leaves


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
