"""run.py end to end with real torchrun + Megatron-Core on the tiny example: run/query/stop with
nothing left behind, resume through the same exp_dir, and errors caught before launch."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flagscale.launcher import hostctl
from tests.conftest import REPO, TINY_CONF, group_members, pids_alive, run_py, tiny_overrides

pytestmark = pytest.mark.integration

SMALL = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 176, "num_attention_heads": 2, "seq_length": 64,
         "max_position_embeddings": 64}


def _metrics(exp: Path) -> list[dict]:
    files = sorted((exp / "logs").glob("*/metrics.jsonl"))
    return [json.loads(line) for line in files[-1].read_text().splitlines()] if files else []


def test_run_query_stop_leaves_no_process(tiny_data: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_data, tmp_path, train_iters=5000, **SMALL)
    proc = run_py(*TINY_CONF, "action=run", *overrides, "train.system.checkpoint.save_interval=5")
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path) in proc.stdout and "action=stop" in proc.stdout
    record = json.loads((tmp_path / "job.json").read_text())
    pgid = record["hosts"][0]["pgid"]
    deadline = time.time() + 240
    while time.time() < deadline and not any(e.get("event") == "checkpoint" for e in _metrics(tmp_path)):
        time.sleep(1)
    assert any(e.get("event") == "checkpoint" for e in _metrics(tmp_path)), "no checkpoint saved in time"
    tree = sorted(hostctl._tree(pgid))  # the job's whole tree, checkpoint helpers included
    assert len(tree) >= 4  # bash, torchrun, 2 workers (+ checkpoint helpers)

    query = run_py(*TINY_CONF, f"experiment.exp_dir={tmp_path}", "action=query")
    assert query.returncode == 0 and "RUNNING" in query.stdout and "iteration" in query.stdout

    again = run_py(*TINY_CONF, "action=run", *overrides)
    assert again.returncode != 0 and "stop it first" in again.stderr

    stop = run_py(*TINY_CONF, f"experiment.exp_dir={tmp_path}", "action=stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not pids_alive(tree), f"left running: {pids_alive(tree)}"
    assert not group_members([pgid])
    query = run_py(*TINY_CONF, f"experiment.exp_dir={tmp_path}", "action=query")
    assert "STOPPED" in query.stdout
    noop = run_py(*TINY_CONF, f"experiment.exp_dir={tmp_path}", "action=stop")
    assert noop.returncode == 0 and "nothing to do" in noop.stdout


def test_test_action_trains_then_resumes(tiny_data: Path, tmp_path: Path) -> None:
    common = [*tiny_overrides(tiny_data, tmp_path, **SMALL), "train.system.checkpoint.save_interval=10"]
    first = run_py(*TINY_CONF, "action=test", *common, "train.model.train_iters=30", "train.model.eval_interval=10")
    assert first.returncode == 0, first.stdout + first.stderr
    events = _metrics(tmp_path)
    losses = [e["loss"] for e in events if e.get("event") == "train"]
    assert losses[-1] < losses[0] - 1.0, losses
    assert any(e.get("event") == "valid" for e in events)
    run_dirs = sorted((tmp_path / "logs").glob("2*"))
    assert (run_dirs[-1] / "loss_curve.png").stat().st_size > 1000

    second = run_py(*TINY_CONF, "action=test", *common, "train.model.train_iters=40")
    assert second.returncode == 0, second.stdout + second.stderr
    start = next(e for e in _metrics(tmp_path) if e.get("event") == "start")
    assert start["start_iteration"] == 30
    log = next(p for p in sorted((tmp_path / "logs").glob("2*"))[-1].glob("*.log"))
    assert "resuming from checkpoint" in log.read_text()
    assert len(sorted((tmp_path / "logs").glob("2*"))) == 2  # one fresh folder per launch


def test_failing_job_exit_code_and_port_in_use(tiny_data: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_py(*TINY_CONF, "action=run", *tiny_overrides(tiny_data, tmp_path, **SMALL),
                      f"+experiment.runner.master_port={port}")
    assert proc.returncode != 0 and f"port {port} is in use" in proc.stderr
    assert not (tmp_path / "job.json").exists()

    # a corrupt checkpoint to resume from: the program fails, `test` returns its exit code
    (tmp_path / "checkpoints" / "iter_0000010").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("10\n")
    proc = run_py(*TINY_CONF, "action=test", *tiny_overrides(tiny_data, tmp_path, **SMALL))
    assert proc.returncode not in (0, None)
    assert "FAILED" in proc.stdout


def test_flagscale_cli_dryrun_and_status(tiny_data: Path, tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "flagscale.cli"]
    out = subprocess.run([*cli, "train", "tiny_gpt", "--dryrun", *tiny_overrides(tiny_data, tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torchrun --nnodes 1 --nproc-per-node 2" in out.stdout and "nothing was started" in out.stdout
    missing = subprocess.run([*cli, "status", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "no job record" in missing.stderr
