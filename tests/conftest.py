"""Shared fixtures: the repo root, a run.py runner, and the tiny dataset (built once per session)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_py(*args: str, cwd: Path = REPO, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python run.py ARGS` as a user would type it; returns the finished process."""
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny_gpt corpus, tokenizer and .bin/.idx files, made by the example's own script."""
    out = tmp_path_factory.mktemp("tiny_data")
    subprocess.run([sys.executable, str(REPO / "examples/tiny_gpt/prepare_data.py"), "--output-dir", str(out)],
                   check=True, capture_output=True, timeout=300)
    return out
