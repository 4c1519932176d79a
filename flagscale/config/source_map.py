"""Where each key of a composed config was set: `file:line` of the YAML that won, or the override.

Hydra composes the primary YAML with the group files its defaults list chooses (`train: 7b` ->
`train/7b.yaml` under the `train.` package), in defaults order, `_self_` where it is listed (at the
end when it is not), then command-line overrides. This module replays that order over the YAML node
trees (which keep line numbers), so an error names the one file that set the key, not every file
that happens to use the same leaf name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

_OVERRIDE = re.compile(r"^[+~]*(?P<key>[\w.@/-]+?)(?:@[\w.]+)?=")


@dataclass(slots=True)
class SourceMap:
    """Dotted key -> where it was set (the last writer wins, as in the composition)."""

    where: dict[str, str] = field(default_factory=dict)

    def set(self, key: str, location: str) -> None:
        self.where[key] = location

    def locate(self, key: str) -> str | None:
        """The location of `key`, else of its closest enclosing key that has one."""
        parts = key.split(".")
        for end in range(len(parts), 0, -1):
            found = self.where.get(".".join(parts[:end]))
            if found:
                return found
        return None


def build_source_map(
    config_dir: Path, config_name: str, choices: Mapping[str, str | None], overrides: Iterable[str]
) -> SourceMap:
    """Replay the composition of `config_name` in `config_dir` (with the chosen group options)."""
    result = SourceMap()
    primary = config_dir / f"{config_name}.yaml"
    root = _load(primary)
    for entry in _defaults_order(root):
        if entry == "_self_":
            _record(root, "", primary, result)
            continue
        group, package = entry
        option = choices.get(group)
        path = config_dir / group / f"{option}.yaml"
        if option and path.is_file():
            _record(_load(path), package, path, result)
    for override in overrides:
        match = _OVERRIDE.match(override)
        if match:
            result.set(match.group("key"), f"command-line override '{override}'")
    return result


def _load(path: Path) -> yaml.Node | None:
    try:
        return yaml.compose(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _defaults_order(root: yaml.Node | None) -> list[str | tuple[str, str]]:
    """The primary YAML's defaults as `_self_` or (group, package), `_self_` last when not listed."""
    order: list[str | tuple[str, str]] = []
    defaults = _child(root, "defaults")
    for item in defaults.value if isinstance(defaults, yaml.SequenceNode) else []:
        if isinstance(item, yaml.ScalarNode) and item.value == "_self_":
            order.append("_self_")
        elif isinstance(item, yaml.MappingNode) and item.value:
            key = item.value[0][0].value.removeprefix("override ").removeprefix("optional ").strip()
            group, _, package = key.partition("@")
            order.append((group, package or group.replace("/", ".")))
    if "_self_" not in order:
        order.append("_self_")
    return order


def _child(node: yaml.Node | None, name: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == name:
                return value
    return None


def _record(node: yaml.Node | None, prefix: str, path: Path, result: SourceMap) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    shown = _display(path)
    for key, value in node.value:
        if not prefix and key.value in ("defaults", "hydra"):
            continue
        dotted = f"{prefix}.{key.value}" if prefix else str(key.value)
        result.set(dotted, f"{shown}:{key.start_mark.line + 1}")
        _record(value, dotted, path, result)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
