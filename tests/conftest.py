"""Shared fixtures: the repo root, a run.py runner, and the tiny dataset (built once per session)."""

from __future__ import annotations

import json
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


TINY_CONF = ("--config-path", str(REPO / "examples/tiny_gpt/conf"), "--config-name", "train")


def tiny_overrides(data: Path, exp_dir: Path, **model: object) -> list[str]:
    """Overrides that point the tiny_gpt example at `data` and `exp_dir`, plus train.model.* values."""
    return [
        f"experiment.exp_dir={exp_dir}",
        f"train.data.data_path=[0.7,{data}/stories_text_document,0.3,{data}/facts_text_document]",
        f"train.data.tokenizer.tokenizer_model={data}/tokenizer",
        *[f"train.model.{k}={v}" for k, v in model.items()],
    ]


def pids_alive(pids: list[int]) -> list[int]:
    """Which of `pids` still run (zombies count as gone)."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except OSError:
            pass
    return alive


def group_members(pgids: list[int]) -> list[int]:
    """Live processes whose process group or session is one of `pgids`."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and (int(fields[3]) in pgids or int(fields[4]) in pgids):
                members.append(int(name))
    return members


def training_ranks(exp_dir: Path) -> list[int]:
    """The training processes of the job recorded in exp_dir on this machine: the children of its torchrun
    (torchrun may start them in sessions of their own, outside the recorded process groups)."""
    record = json.loads((Path(exp_dir) / "job.json").read_text())
    members = set(group_members([h["pgid"] for h in record["hosts"] if h["pgid"]]))
    ranks = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        is_rank = len(argv) > 1 and b"torchrun" not in argv[1] and any(b"train_gpt.py" in a for a in argv)
        if parent in members and is_rank:
            ranks.append(int(name))
    return ranks
