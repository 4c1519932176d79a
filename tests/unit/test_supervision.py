"""The supervisor's pieces that need no running job: the policy per task type, the watchdog's hang and health
verdicts (on a clock it is given), goodput from the events and metrics files, spare hosts, and the process
identity by which `stop` finds the supervisor (never a process that reused its pid)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from flagscale.config.schema import RunnerConfig
from flagscale.exceptions import ConfigError
from flagscale.runner.metrics import MetricsSummary
from flagscale.spec.process import is_alive, process_identity, terminate
from flagscale.spec.record import JobState
from flagscale.supervisor import restart
from flagscale.supervisor.restart import RestartPolicy, Watchdog, goodput
from tests.helpers.jobs import tiny_job


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(restart.time, "monotonic", fake)
    return fake


def at(iteration: int | None) -> MetricsSummary:
    return MetricsSummary(train_iters=100, iteration=iteration)


def test_the_policy_per_task_type() -> None:
    runner = RunnerConfig(max_restarts=2, restart_backoff=3.0, hang_timeout=60.0)
    train = RestartPolicy.of(runner, "train")
    assert (train.max_restarts, train.backoff_s, train.hang_timeout_s, train.watch_health) == (2, 3.0, 60.0, False)
    serve = RestartPolicy.of(runner, "serve")
    assert serve.watch_health and serve.hang_timeout_s is None and serve.max_restarts == 2
    assert RestartPolicy.of(runner, "inference") == RestartPolicy()
    assert not RestartPolicy.of(RunnerConfig(), "train").needs_supervisor
    assert RestartPolicy.of(RunnerConfig(hang_timeout=5.0), "train").needs_supervisor


@pytest.mark.parametrize("bad", [0, -1, "soon"])
def test_hang_timeout_must_be_positive_seconds(bad: object) -> None:
    with pytest.raises(ConfigError, match="hang_timeout must be seconds > 0"):
        RunnerConfig(hang_timeout=bad)  # type: ignore[arg-type]


def test_no_new_iteration_for_hang_timeout_is_a_hang(clock: Clock) -> None:
    dog = Watchdog(RestartPolicy(hang_timeout_s=30.0))
    assert dog.check(JobState.RUNNING, at(5)) is None
    clock.now += 29
    assert dog.check(JobState.RUNNING, at(5)) is None
    clock.now += 2
    assert dog.check(JobState.RUNNING, at(5)) == "hang"
    assert dog.seconds_since_iteration == pytest.approx(31)


def test_each_new_iteration_resets_the_clock(clock: Clock) -> None:
    dog = Watchdog(RestartPolicy(hang_timeout_s=30.0))
    for iteration in range(1, 10):
        clock.now += 20
        assert dog.check(JobState.RUNNING, at(iteration)) is None


def test_start_up_gets_four_timeouts_before_the_first_iteration(clock: Clock) -> None:
    dog = Watchdog(RestartPolicy(hang_timeout_s=30.0))
    clock.now += 119
    assert dog.check(JobState.RUNNING, None) is None
    clock.now += 2
    assert dog.check(JobState.RUNNING, None) == "hang"


def test_no_hang_when_not_running_or_ended_or_not_watched(clock: Clock) -> None:
    dog = Watchdog(RestartPolicy(hang_timeout_s=10.0))
    dog.check(JobState.RUNNING, at(5))
    clock.now += 100
    assert dog.check(JobState.COMPLETED, at(5)) is None
    ended = at(5)
    ended.ended = True
    assert dog.check(JobState.RUNNING, ended) is None
    unwatched = Watchdog(RestartPolicy())
    clock.now += 10_000
    assert unwatched.check(JobState.RUNNING, at(1)) is None


class Health(BaseHTTPRequestHandler):
    ok = True

    def do_GET(self) -> None:
        self.send_response(200 if Health.ok else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_server_failing_its_health_check_three_polls_in_a_row_is_unhealthy() -> None:
    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/health"
        dog = Watchdog(RestartPolicy(max_restarts=1, watch_health=True), [url])
        Health.ok = True
        assert dog.check(JobState.RUNNING, None) is None
        Health.ok = False
        assert [dog.check(JobState.RUNNING, None) for _ in range(3)] == [None, None, "unhealthy"]
        Health.ok = True
        assert dog.check(JobState.RUNNING, None) is None  # answering again resets the count
    finally:
        server.shutdown()


def write_run(folder: Path, iterations: range, step_ms: float) -> Path:
    folder.mkdir(parents=True)
    path = folder / "metrics.jsonl"
    lines = [{"event": "start", "train_iters": 30}] + [
        {"event": "train", "iteration": i, "loss": 1.0, "step_time_ms": step_ms} for i in iterations
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_goodput_counts_each_iteration_once_over_the_whole_wall_time(tmp_path: Path) -> None:
    first = write_run(tmp_path / "a", range(1, 16), 1000.0)  # failed after 15; checkpoint at 10
    second = write_run(tmp_path / "b", range(11, 31), 500.0)  # redid 11-15
    events = [
        {"event": "launched", "time": 105.0, "created": 100.0, "metrics": str(first)},
        {"event": "failed", "time": 130.0},
        {"event": "launched", "time": 140.0, "created": 139.0, "metrics": str(second)},
        {"event": "ended", "time": 160.0},
    ]
    found = goodput(events)
    assert found is not None
    assert found.kept_s == pytest.approx(10 * 1.0 + 20 * 0.5)  # 1-10 from the first launch, 11-30 from the second
    assert found.wall_s == pytest.approx(60.0)
    assert found.redone == 5
    assert found.ratio == pytest.approx(20 / 60)


def test_goodput_without_metrics_is_none(tmp_path: Path) -> None:
    assert goodput([]) is None
    assert goodput([{"event": "launched", "time": 1.0, "metrics": str(tmp_path / "missing.jsonl")}]) is None


def test_lost_hosts_are_replaced_by_the_spares_after_nnodes(tmp_path: Path) -> None:
    from flagscale.config.loader import select_hosts

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=1\nn2 slots=1\nn3 slots=1\n")
    job = tiny_job(f"+experiment.runner.hostfile={hostfile}", "experiment.runner.nnodes=2")
    assert [h.name for h in select_hosts(job)] == ["n1", "n2"]
    assert [h.name for h in select_hosts(job, exclude=["n2"])] == ["n1", "n3"]
    with pytest.raises(ConfigError, match=r"2 host\(s\) needed but hostfile .* has 1 left without the lost host\(s\) "
                                          r"n2, n3; add a spare host"):
        select_hosts(job, exclude=["n2", "n3"])


def test_a_process_identity_outlives_no_reuse_of_its_pid() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        identity = process_identity(child.pid)
        assert is_alive(identity)
        assert not is_alive({**identity, "start": identity["start"] - 1})  # same pid, another process
        assert not is_alive(process_identity(__import__("os").getpid()))  # never this process itself
        begun = time.monotonic()
        assert terminate(identity, timeout=5)
        assert time.monotonic() - begun < 5
        child.wait(timeout=5)
        assert not is_alive(identity) and not terminate(identity, timeout=1)
    finally:
        child.kill()
