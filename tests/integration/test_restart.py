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
from tests.conftest import REPO, TINY_CONF, group_members, pids_alive, tiny_overrides, training_ranks
from tests.helpers.requires import needs
from tests.helpers.sshd import SSHCluster, sshd_available

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ITERS, SAVE = 60, 10
HANG = 45


def start(tmp_path: Path, data: Path, *extra: str, action: str = "test", env: dict | None = None) -> subprocess.Popen:
    argv = [sys.executable, str(REPO / "run.py"), *TINY_CONF, f"action={action}",
            *tiny_overrides(data, tmp_path / "exp", train_iters=ITERS, eval_interval=1000),
            "train.system.logging.log_interval=1", f"train.system.checkpoint.save_interval={SAVE}",
            "++experiment.runner.max_restarts=1",
            "++experiment.runner.restart_backoff=1", *extra]  # fmt: skip
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def train_iterations(exp_dir: Path) -> list[list[int]]:
    """The iterations each launch logged, launch by launch (one logs/<run id>/ folder each)."""
    runs = []
    for metrics in sorted(exp_dir.glob("logs/*/metrics.jsonl")):
        events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        runs.append([e["iteration"] for e in events if e["event"] == "train"])
    return runs


def events_of(exp_dir: Path) -> list[dict]:
    record = json.loads((exp_dir / "job.json").read_text())
    path = Path(record["info"]["supervisor"]["events"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_until(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the job ended first:\n{proc.communicate()[0][-3000:]}")
        assert time.time() < deadline, f"no {what} within {timeout:.0f}s"
        time.sleep(0.5)


def reached(exp_dir: Path, iteration: int) -> bool:
    return any(max(run, default=0) >= iteration for run in train_iterations(exp_dir))


def query(exp_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run.py"), *TINY_CONF, f"experiment.exp_dir={exp_dir}",
                           "action=query"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})  # fmt: skip


def supervisor_of(exp_dir: Path) -> int:
    return json.loads((exp_dir / "job.json").read_text())["info"]["supervisor"]["pid"]


@needs(sshd_available(), "needs root and openssh-server (apt-get install openssh-server)")
def test_run_leaves_a_supervisor_that_resumes_a_job_whose_rank_was_killed(tiny_data: Path, tmp_path: Path) -> None:
    """2 sshd hosts x 1 process: action=run returns at once; its detached supervisor diagnoses the rank killed on
    the second host (not the first host's communication error it causes), relaunches from the last checkpoint,
    sees the job complete and exits."""
    exp_dir = tmp_path / "exp"
    cluster = SSHCluster(tmp_path / "ssh")
    try:
        for addr in ("127.0.0.2", "127.0.0.3"):
            cluster.start(addr)
        hostfile = cluster.hostfile(tmp_path / "hostfile.txt")
        started = start(tmp_path, tiny_data, f"+experiment.runner.hostfile={hostfile}", "experiment.runner.nnodes=2",
                        "experiment.runner.nproc_per_node=1", "+experiment.envs.GLOO_SOCKET_IFNAME=lo",
                        action="run", env=cluster.env)
        out, _ = started.communicate(timeout=120)
        assert started.returncode == 0 and "supervisor: pid" in out, out[-3000:]
        supervisor = supervisor_of(exp_dir)
        assert pids_alive([supervisor])
        killed_and_resumed(exp_dir, supervisor, cluster.env)
    finally:
        cluster.stop_all()


def killed_and_resumed(exp_dir: Path, supervisor: int, env: dict) -> None:
    wait_until(lambda: reached(exp_dir, SAVE + 5), 300, f"iteration {SAVE + 5}")
    record = json.loads((exp_dir / "job.json").read_text())
    second_host = set(group_members([record["hosts"][1]["pgid"]]))
    victims = [pid for pid in training_ranks(exp_dir) if parent_of(pid) in second_host]
    assert len(victims) == 1, victims
    os.kill(victims[0], signal.SIGKILL)
    wait_until(lambda: any(e["event"] == "ended" for e in events_of(exp_dir)), 400, "end of the supervised job")
    wait_until(lambda: not pids_alive([supervisor]), 30, "supervisor exit")
    first, second = train_iterations(exp_dir)
    assert second[-1] == ITERS
    assert min(second) - 1 >= (max(first) // SAVE) * SAVE  # resumed from the last checkpoint
    assert max(first) - (min(second) - 1) <= SAVE  # at most one save interval redone
    record = json.loads((exp_dir / "job.json").read_text())
    assert record["info"]["supervisor"]["restarts"] == 1
    assert record["info"]["supervisor"]["kind"] == Kind.RANK_KILLED.value
    events = events_of(exp_dir)
    assert [e["event"] for e in events] == ["launched", "failed", "launched", "ended"]
    assert events[1]["kind"] == Kind.RANK_KILLED.value and events[-1]["state"] == "COMPLETED"
    shown = query(exp_dir, env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "restarts: 1; last failure: rank 1 on host 127.0.0.3 was killed" in shown.stdout, shown.stdout
    assert "(not running)" in shown.stdout, shown.stdout
    goodput = re.search(r"goodput: (\d\.\d+) \(.* (\d+) iteration\(s\) redone\)", shown.stdout)
    assert goodput and 0 < float(goodput.group(1)) < 1 and int(goodput.group(2)) == max(first) - (min(second) - 1)
    assert not group_members([h["pgid"] for h in record["hosts"]])


def test_a_hung_rank_is_detected_its_stacks_saved_and_the_job_restarted(tiny_data: Path, tmp_path: Path) -> None:
    """SIGSTOP one rank: no new iteration for hang_timeout -> py-spy stacks of every rank saved, job stopped,
    launched again from the last checkpoint, completes."""
    exp_dir = tmp_path / "exp"
    proc = start(tmp_path, tiny_data, f"++experiment.runner.hang_timeout={HANG}")
    wait_until(lambda: reached(exp_dir, SAVE + 5), 300, f"iteration {SAVE + 5}", proc)
    victims = training_ranks(exp_dir)
    os.kill(victims[1], signal.SIGSTOP)
    stopped_at = time.time()
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    hang = next(e for e in events_of(exp_dir) if e["event"] == "hang")
    assert hang["time"] - stopped_at <= HANG + 10, hang
    assert "no new iteration" in out and "restart 1 of 1" in out, out[-4000:]
    stacks = [Path(f).read_text() for f in hang["stacks"]]
    assert len(stacks) >= 3, hang  # torchrun and both ranks
    assert sum("train_gpt.py" in s or "trainer.py" in s for s in stacks) >= 2, stacks
    assert train_iterations(exp_dir)[-1][-1] == ITERS
    assert not pids_alive(victims)


def test_stop_during_a_restart_leaves_no_process_and_no_supervisor(tiny_data: Path, tmp_path: Path) -> None:
    exp_dir = tmp_path / "exp"
    started = start(tmp_path, tiny_data, "++experiment.runner.restart_backoff=60", action="run")
    assert started.communicate(timeout=120)[0] and started.returncode == 0
    supervisor = supervisor_of(exp_dir)
    wait_until(lambda: reached(exp_dir, 3), 300, "iteration 3")
    first_ranks = training_ranks(exp_dir)
    os.kill(first_ranks[0], signal.SIGKILL)
    wait_until(lambda: any(e["event"] == "failed" for e in events_of(exp_dir)), 120, "the failure")
    stopped = subprocess.run([sys.executable, str(REPO / "run.py"), *TINY_CONF, f"experiment.exp_dir={exp_dir}",
                              "action=stop"], cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert stopped.returncode == 0 and f"stopped the supervisor (pid {supervisor})" in stopped.stdout, stopped.stdout
    assert not pids_alive([supervisor, *first_ranks])
    time.sleep(3)
    assert len(train_iterations(exp_dir)) == 1  # never relaunched
    record = json.loads((exp_dir / "job.json").read_text())
    assert not group_members([h["pgid"] for h in record["hosts"]])
    assert [e["event"] for e in events_of(exp_dir)][-1] == "ended"


def test_a_failure_a_restart_cannot_cure_is_not_retried(tiny_data: Path, tmp_path: Path) -> None:
    checkpoints = tmp_path / "exp" / "checkpoints"  # a corrupt checkpoint to resume from: fails the same way each time
    (checkpoints / "iter_0000010").mkdir(parents=True)
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("10\n")
    proc = start(tmp_path, tiny_data)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "diagnosis:" in out and "not restarted" in out, out[-3000:]
    assert len(list((tmp_path / "exp" / "logs").glob("*/localhost.log"))) == 1  # launched once
    shown = query(tmp_path / "exp")
    found = re.search(r"diagnosis: rank \d on host localhost failed", shown.stdout)
    assert shown.returncode == 1 and found, shown.stdout
    assert "is incomplete or corrupt" in shown.stdout
    record = json.loads((tmp_path / "exp" / "job.json").read_text())
    assert not group_members([h["pgid"] for h in record["hosts"]])  # nothing left behind


@needs(sshd_available(), "needs root and openssh-server (apt-get install openssh-server)")
def test_a_lost_host_is_replaced_by_a_spare_from_the_hostfile(tiny_data: Path, tmp_path: Path) -> None:
    """Three sshd hosts, nnodes=2: the second host's processes and its sshd die mid-run; the supervisor
    diagnoses the lost host and relaunches on the first and the spare, which complete the job."""
    exp_dir = tmp_path / "exp"
    cluster = SSHCluster(tmp_path / "ssh")
    try:
        for addr in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            cluster.start(addr)
        hostfile = cluster.hostfile(tmp_path / "hostfile.txt")
        proc = start(tmp_path, tiny_data, f"+experiment.runner.hostfile={hostfile}", "experiment.runner.nnodes=2",
                     "experiment.runner.nproc_per_node=1", "+experiment.envs.GLOO_SOCKET_IFNAME=lo",
                     "++experiment.runner.ssh_connect_timeout=3", env=cluster.env)
        wait_until(lambda: reached(exp_dir, SAVE + 5), 300, f"iteration {SAVE + 5}", proc)
        record = json.loads((exp_dir / "job.json").read_text())
        lost = record["hosts"][1]
        assert lost["host"]["name"] == "127.0.0.3"
        members = group_members([lost["pgid"]])
        doomed = members + [pid for pid in training_ranks(exp_dir) if parent_of(pid) in members]
        cluster.servers[1].crash()
        for pid in doomed:
            os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-4000:]
        assert "host 127.0.0.3 did not answer" in out and "without host 127.0.0.3" in out, out[-4000:]
        assert "host lost" in [e.get("kind") for e in events_of(exp_dir)]
        launches = [e for e in events_of(exp_dir) if e["event"] == "launched"]
        assert [e["hosts"] for e in launches] == [["127.0.0.2", "127.0.0.3"], ["127.0.0.2", "127.0.0.4"]]
        assert train_iterations(exp_dir)[-1][-1] == ITERS
        record = json.loads((exp_dir / "job.json").read_text())
        assert record["info"]["supervisor"]["lost_hosts"] == ["127.0.0.3"]
        assert not group_members([h["pgid"] for h in record["hosts"]])
    finally:
        cluster.stop_all()


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
