"""Imports point down only (cli/actions -> jobs -> runner + launcher -> spec/config), read from the source:
the leaf imports nothing above it, the launcher no runner, and nothing below the actions imports them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "flagscale"


def flagscale_imports(path: Path) -> set[str]:
    """Every flagscale module a file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flagscale"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("flagscale")}
    return found


def modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py")) if folder else [PACKAGE / "jobs.py"]


FORBIDDEN = {  # folder -> prefixes its modules must not import
    "spec": ("flagscale.runner", "flagscale.launcher", "flagscale.jobs", "flagscale.auto_tuner", "flagscale.serve"),
    "launcher": ("flagscale.runner", "flagscale.jobs", "flagscale.auto_tuner"),
    "auto_tuner": ("flagscale.runner.actions", "flagscale.cli", "flagscale.main"),
    "": ("flagscale.runner.actions", "flagscale.cli", "flagscale.main", "flagscale.auto_tuner"),  # jobs.py
}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_point_down(folder: str) -> None:
    upward = {
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in modules(folder)
        for name in flagscale_imports(path)
        if name.startswith(FORBIDDEN[folder])
    }
    assert not upward, sorted(upward)
