"""The launcher on this machine: start in a new session, status, stop of the whole tree
(including children that moved to sessions of their own, as torchrun's workers do)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flagscale import jobs
from flagscale.config.hostfile import LOCALHOST
from flagscale.exceptions import LaunchError
from flagscale.launcher.launcher import Launcher, job_state
from flagscale.launcher.transport import LocalTransport, SSHSettings
from flagscale.runner import actions
from flagscale.spec.plan import Plan, ProcessSpec
from flagscale.spec.record import JobState, LauncherSettings, load_record
from tests.conftest import group_members, pids_alive, tiny_overrides
from tests.helpers.jobs import SLEEPER, sleeper_overrides, tiny_job, wait_for

pytestmark = pytest.mark.integration

# A parent that starts a child in a session of its own (like torchrun), then both sleep.
SPAWNER = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
    "open(sys.argv[1], 'w').write(str(child.pid))\n"
    "time.sleep(300)\n"
)


def _plan(tmp_path: Path, argv: list[str]) -> Plan:
    log_dir = tmp_path / "logs" / "run1"
    spec = ProcessSpec(host=LOCALHOST, node_rank=0, argv=argv, cwd=str(tmp_path),
                       log_path=str(log_dir / "localhost.log"), env={"GREETING": "it's $(not run)"})
    return Plan(task_type="train", exp_dir=str(tmp_path), run_id="run1", log_dir=str(log_dir), processes=[spec])


SETTINGS = LauncherSettings(stop_timeout=2.0, python=sys.executable)


def _record_base(plan: Plan) -> dict:
    return {"run_id": plan.run_id, "task_type": "train", "exp_name": "t", "exp_dir": plan.exp_dir,
            "log_dir": plan.log_dir, "created_at": time.time(),
            "settings": SETTINGS, "master_addr": "localhost", "master_port": None}


def _launcher() -> Launcher:
    return Launcher(ssh=SSHSettings(), python=sys.executable)


def test_stop_ends_children_in_their_own_sessions(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    plan = _plan(tmp_path, [sys.executable, "-c", SPAWNER, str(pid_file)])
    with _launcher() as launcher:
        record = launcher.launch(plan, _record_base(plan))
        record.save()
        for _ in range(100):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert os.getpgid(child) != record.hosts[0].pgid  # really in another group
        statuses = launcher.status(record)
        assert job_state(statuses, False) is JobState.RUNNING
        assert child in statuses[0].pids
        results = launcher.stop(load_record(tmp_path), timeout=5)
    assert results[0].found >= 3 and not results[0].remaining
    assert not pids_alive([child, record.hosts[0].pgid])


def test_completed_job_and_literal_env(tmp_path: Path) -> None:
    plan = _plan(tmp_path, ["bash", "-c", 'sleep 0.7; printf "%s" "$GREETING" > out.txt; exit 0'])
    with _launcher() as launcher:
        record = launcher.launch(plan, _record_base(plan))
        deadline = time.time() + 10
        while job_state(launcher.status(record), False) is JobState.RUNNING and time.time() < deadline:
            time.sleep(0.1)
        assert job_state(launcher.status(record), False) is JobState.COMPLETED
        assert launcher.stop(record, timeout=1)[0].found == 0  # stop of an ended job is a no-op
    assert (tmp_path / "out.txt").read_text() == "it's $(not run)"


def test_immediate_failure_is_a_launch_error(tmp_path: Path) -> None:
    plan = _plan(tmp_path, ["bash", "-c", "echo boom >&2; exit 3"])
    with _launcher() as launcher, pytest.raises(LaunchError, match="status 3") as err:
        launcher.launch(plan, _record_base(plan))
    assert "boom" in str(err.value)


def test_failed_job_state(tmp_path: Path) -> None:
    plan = _plan(tmp_path, ["bash", "-c", "sleep 0.8; exit 7"])
    with _launcher() as launcher:
        record = launcher.launch(plan, _record_base(plan))
        time.sleep(1.5)
        statuses = launcher.status(record)
    assert job_state(statuses, False) is JobState.FAILED
    assert statuses[0].exit_code == 7


# --- a launch that ends half-way, for any reason, stops what started and still writes job.json ---


def _pair_plan(tmp_path: Path) -> Plan:
    """Two processes on this machine (labels a and b, as serve plans a server and a Ray node)."""
    log_dir = tmp_path / "logs" / "run1"
    specs = [ProcessSpec(host=LOCALHOST, node_rank=rank, argv=[sys.executable, str(SLEEPER)], cwd=str(tmp_path),
                         log_path=str(log_dir / f"localhost-{label}.log"), label=label,
                         env={"SLEEPER_DIR": str(tmp_path / "sleepers")})
             for rank, label in enumerate("ab")]
    return Plan(task_type="serve", exp_dir=str(tmp_path), run_id="run1", log_dir=str(log_dir), processes=specs)


def _is_start_of_b(args: tuple) -> bool:
    return args[0] == "start" and args[1].endswith("-b.sh")


def _garbled_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """b's host controller starts b, but its answer is not what the launcher expects."""
    real = Launcher.hostctl

    def hostctl(self: Launcher, host, *args: str, **kwargs) -> dict:
        answer = real(self, host, *args, **kwargs)
        return {"pid": "?"} if _is_start_of_b(args) else answer

    monkeypatch.setattr(Launcher, "hostctl", hostctl)


def _local_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """b's host controller starts b, then outlives the launcher's time limit (a real subprocess time-out)."""
    real = LocalTransport.run

    def run(self: LocalTransport, argv: list[str], timeout: float | None = None):
        if _is_start_of_b(tuple(argv[4:])):
            return real(self, [*argv[:-1], "30"], timeout=1.0)  # grace 30 s, limit 1 s
        return real(self, argv, timeout)

    monkeypatch.setattr(LocalTransport, "run", run)


def _interrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C arrives while b is being started (after b's process began)."""
    real = Launcher.hostctl

    def hostctl(self: Launcher, host, *args: str, **kwargs) -> dict:
        answer = real(self, host, *args, **kwargs)
        if _is_start_of_b(args):
            raise KeyboardInterrupt
        return answer

    monkeypatch.setattr(Launcher, "hostctl", hostctl)


@pytest.mark.parametrize("inject", [_garbled_answer, _local_timeout, _interrupt], ids=lambda f: f.__name__[1:])
def test_launch_ending_half_way_stops_everything_and_records_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                inject) -> None:
    plan = _pair_plan(tmp_path)
    inject(monkeypatch)
    with _launcher() as launcher, pytest.raises((LaunchError, KeyboardInterrupt)):
        launcher.launch(plan, _record_base(plan))
    record = load_record(tmp_path)  # written although the launch failed
    pgids = [h.pgid for h in record.hosts]
    assert len(pgids) == 2 and all(pgids), pgids  # b's process, whose answer was lost, was found too
    wait_for(lambda: not group_members(pgids), 10, "the started processes to end")
    assert all(h.stopped_at is not None for h in record.hosts)


def test_interrupt_after_start_stops_the_job(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C between the start and the end of `launch` (here: while recording the last job)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    job = tiny_job(*tiny_overrides(tiny_data, tmp_path), *sleeper_overrides(tmp_path))

    def interrupted(exp_dir: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "remember_last_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        actions.launch(job)
    record = json.loads((tmp_path / "job.json").read_text())
    pgids = [h["pgid"] for h in record["hosts"]]
    wait_for(lambda: not group_members(pgids), 10, "the job to be stopped")
    assert record["stop_requested_at"] is not None and record["hosts"][0]["stopped_at"] is not None


# --- stop/query act only on the processes the launch started, never on a recycled pid/pgid ---

# A session leader that starts a child in its own session and exits: the child is left without its leader.
LEADERLESS = (
    "import subprocess, sys\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
    "open(sys.argv[1], 'w').write(str(child.pid))\n"
)


@pytest.fixture
def strangers(tmp_path: Path):
    """Processes that are not the job's, in sessions of their own; killed by pid at the end."""
    started: list[int] = []

    def start(code: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], start_new_session=True)
        started.append(proc.pid)
        return proc

    yield start, started
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _ended_job(tmp_path: Path, launcher: Launcher):
    plan = _plan(tmp_path, ["bash", "-c", "exit 0"])
    record = launcher.launch(plan, _record_base(plan))
    wait_for(lambda: job_state(launcher.status(record), False) is JobState.COMPLETED, 10, "the job to end")
    return record


def test_recycled_pgid_is_never_signalled(tmp_path: Path, strangers, capsys: pytest.CaptureFixture[str]) -> None:
    start, started = strangers
    leader = start("import time; time.sleep(300)")  # now owns the number the record names
    orphan_file = tmp_path / "orphan.pid"
    start(LEADERLESS, str(orphan_file)).wait(10)  # a group/session whose leader is gone, as an ended job's
    wait_for(lambda: orphan_file.exists() and orphan_file.read_text(), 10, "the orphan")
    orphan = int(orphan_file.read_text())
    started.append(orphan)
    with _launcher() as launcher:
        record = _ended_job(tmp_path, launcher)
        for recycled in (leader.pid, started[1]):
            record.hosts[0].pgid, record.hosts[0].stopped_at = recycled, None
            statuses = launcher.status(record)
            assert statuses[0].pids == [] and job_state(statuses, False) is JobState.COMPLETED
            results = launcher.stop(record, timeout=2)
            assert results[0].found == 0 and not results[0].remaining
    record.hosts[0].stopped_at = None
    record.save()
    assert actions.stop_job(tmp_path) == 0
    assert "already ended; nothing was signalled" in capsys.readouterr().out
    assert pids_alive([leader.pid, orphan]) == [leader.pid, orphan]


def test_stop_ends_what_an_ended_script_left_behind(tmp_path: Path) -> None:
    """The script ended, a background child it started lives on: still the job's, so stop ends it."""
    child_file = tmp_path / "child.pid"
    plan = _plan(tmp_path, ["bash", "-c", f"sleep 300 & echo $! > {child_file}; exit 0"])
    with _launcher() as launcher:
        record = launcher.launch(plan, _record_base(plan))
        wait_for(lambda: child_file.exists() and child_file.read_text().strip(), 10, "the child")
        child = int(child_file.read_text())
        wait_for(lambda: not pids_alive([record.hosts[0].pgid]), 10, "the script to end")
        assert launcher.status(record)[0].pids == [child]
        results = launcher.stop(record, timeout=2)
    assert results[0].found == 1 and not pids_alive([child])


def test_version_1_record_loads_and_is_checked_by_script(tmp_path: Path, strangers) -> None:
    """A job.json written before start times were recorded: its leader is checked by its command line."""
    start, _ = strangers
    stranger = start("import time; time.sleep(300)")
    plan = _plan(tmp_path, [sys.executable, "-c", "import time; time.sleep(300)"])
    with _launcher() as launcher:
        launcher.launch(plan, _record_base(plan))
    data = json.loads((tmp_path / "job.json").read_text())
    real_pgid = data["hosts"][0]["pgid"]
    data["version"] = 1
    for host in data["hosts"]:
        del host["start_time"], host["pid_file"]
    for pgid, found in ((stranger.pid, 0), (real_pgid, 2)):  # the script's bash and its python
        data["hosts"][0]["pgid"] = pgid
        (tmp_path / "job.json").write_text(json.dumps(data))
        with _launcher() as launcher:
            record = load_record(tmp_path)
            assert record.hosts[0].start_time is None
            assert launcher.stop(record, timeout=2)[0].found == found
    assert pids_alive([stranger.pid]) == [stranger.pid] and not pids_alive([real_pgid])


def test_dryrun_never_rewrites_the_script_a_running_job_executes(tiny_data: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """bash re-reads a script while it runs: each launch and each dryrun writes its own, under its run id."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    overrides = [*tiny_overrides(tiny_data, tmp_path), *sleeper_overrides(tmp_path)]
    record = actions.launch(tiny_job(*overrides))
    try:
        script = Path(record.hosts[0].script)
        before = script.read_text()
        assert actions.dryrun(tiny_job(*overrides, "train.model.num_layers=2", action="dryrun")) == 0
        assert script.read_text() == before
        assert script.parent == Path(record.log_dir) / "scripts"
        dry = [p for p in (tmp_path / "logs").glob("*/scripts/localhost.sh") if p != script]
        assert len(dry) == 1 and "--num-layers 2" in dry[0].read_text()
    finally:
        actions.stop_job(tmp_path)


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_holding_the_jobs_environment_are_owner_only(tiny_data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    old_umask = os.umask(0o022)
    try:
        overrides = [*tiny_overrides(tiny_data, tmp_path), *sleeper_overrides(tmp_path), "+experiment.envs.TOKEN=s3"]
        assert actions.dryrun(tiny_job(*overrides, action="dryrun")) == 0
        record = actions.launch(tiny_job(*overrides))
    finally:
        os.umask(old_umask)
    try:
        host = record.hosts[0]
        dry_scripts = [p for p in (tmp_path / "logs").glob("*/scripts") if p != Path(host.script).parent]
        modes = {"run dir": (record.log_dir, 0o700), "scripts dir": (Path(host.script).parent, 0o700),
                 "script": (host.script, 0o700), "job.json": (tmp_path / "job.json", 0o600),
                 "config.yaml": (Path(record.log_dir) / "config.yaml", 0o600), "log": (host.log_path, 0o600),
                 "pid file": (host.pid_file, 0o600), "dryrun run dir": (dry_scripts[0].parent, 0o700),
                 "dryrun scripts dir": (dry_scripts[0], 0o700),
                 "dryrun script": (dry_scripts[0] / "localhost.sh", 0o700)}
        wrong = {name: oct(_mode(path)) for name, (path, mode) in modes.items() if _mode(path) != mode}
        assert not wrong, wrong
    finally:
        actions.stop_job(tmp_path)
