"""A training job survives a killed rank: `action=test` with experiment.runner.max_restarts diagnoses the failure,
stops what is left, launches again and resumes from the latest checkpoint; a failure a restart cannot cure is
not retried. Real torchrun, the real training program, a real SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flagscale.supervisor.diagnosis import Kind
from tests.conftest import REPO, TINY_CONF, tiny_overrides, training_ranks

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ITERS, SAVE = 60, 10


def start(tmp_path: Path, data: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, str(REPO / "run.py"), *TINY_CONF, "action=test",
            *tiny_overrides(data, tmp_path / "exp", train_iters=ITERS, eval_interval=1000),
            "train.system.logging.log_interval=1", f"train.system.checkpoint.save_interval={SAVE}",
            "++experiment.runner.max_restarts=1",
            "++experiment.runner.restart_backoff=1", *extra]  # fmt: skip
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train_iterations(exp_dir: Path) -> list[list[int]]:
    """The iterations each launch logged, launch by launch (one logs/<run id>/ folder each)."""
    runs = []
    for metrics in sorted(exp_dir.glob("logs/*/metrics.jsonl")):
        events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        runs.append([e["iteration"] for e in events if e["event"] == "train"])
    return runs


def test_killed_rank_is_diagnosed_and_the_job_resumes_to_the_end(tiny_data: Path, tmp_path: Path) -> None:
    exp_dir = tmp_path / "exp"
    proc = start(tmp_path, tiny_data)
    deadline = time.time() + 300
    while not any(max(run, default=0) >= SAVE + 5 for run in train_iterations(exp_dir)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.5)
    victims = training_ranks(exp_dir)
    assert len(victims) == 2, victims
    os.kill(victims[1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    assert "diagnosis:" in out and "restart 1 of 1" in out, out[-4000:]
    first, second = train_iterations(exp_dir)
    assert second[-1] == ITERS
    assert min(second) - 1 >= (max(first) // SAVE) * SAVE  # resumed from the last checkpoint
    assert max(first) - (min(second) - 1) <= SAVE  # at most one save interval redone
    record = json.loads((exp_dir / "job.json").read_text())
    assert record["info"]["supervisor"]["restarts"] == 1
    assert record["info"]["supervisor"]["kind"] == Kind.RANK_KILLED.value
    events = [json.loads(line) for line in Path(record["info"]["supervisor"]["events"]).read_text().splitlines()]
    assert [e["event"] for e in events] == ["launched", "failed", "launched", "ended"]
    assert events[1]["kind"] == Kind.RANK_KILLED.value and events[-1]["state"] == "COMPLETED"
    query = subprocess.run([sys.executable, str(REPO / "run.py"), *TINY_CONF, f"experiment.exp_dir={exp_dir}",
                            "action=query"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert "restarts before this run: 1" in query.stdout, query.stdout


def test_a_failure_a_restart_cannot_cure_is_not_retried(tiny_data: Path, tmp_path: Path) -> None:
    checkpoints = tmp_path / "exp" / "checkpoints"  # a corrupt checkpoint to resume from: fails the same way each time
    (checkpoints / "iter_0000010").mkdir(parents=True)
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("10\n")
    proc = start(tmp_path, tiny_data)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "diagnosis:" in out and "not restarted" in out, out[-3000:]
    assert len(list((tmp_path / "exp" / "logs").glob("*/localhost.log"))) == 1  # launched once
    query = subprocess.run([sys.executable, str(REPO / "run.py"), *TINY_CONF, f"experiment.exp_dir={tmp_path / 'exp'}",
                            "action=query"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    found = re.search(r"diagnosis: rank \d on host localhost failed", query.stdout)
    assert query.returncode == 1 and found, query.stdout
    assert "is incomplete or corrupt" in query.stdout
