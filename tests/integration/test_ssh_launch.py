"""Multi-host launches over real SSH: each host is an OpenSSH server on its own loopback address.
The per-host program is the light sleeper (runner.backend=direct), so these tests exercise the
launcher, not the engine; test_train_ssh.py runs real Megatron-Core training the same way."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flagscale import jobs
from flagscale.exceptions import LaunchError
from tests.conftest import TINY_CONF, group_members, pids_alive, run_py, tiny_overrides
from tests.helpers.jobs import sleeper_overrides, tiny_job, wait_for
from tests.helpers.requires import requirement
from tests.helpers.sshd import SSHCluster, free_port, sshd_available

pytestmark = pytest.mark.integration
_sshd = requirement(sshd_available(), "needs root and openssh-server (apt-get install openssh-server)")

SLEEPER = Path(__file__).resolve().parents[1] / "helpers" / "sleeper.py"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    cluster = SSHCluster(tmp_path_factory.mktemp("ssh"))
    cluster.start("127.0.0.2")
    cluster.start("127.0.0.3")
    yield cluster
    cluster.stop_all()


def _light(cluster: SSHCluster, tiny_data: Path, exp: Path, hostfile: Path, *extra: str):
    """run.py with the light per-host command, over SSH to the hosts of `hostfile`."""
    return run_py(
        *TINY_CONF, *tiny_overrides(tiny_data, exp), f"+experiment.runner.hostfile={hostfile}",
        "experiment.runner.nnodes=null", "experiment.runner.nproc_per_node=1", "experiment.runner.backend=direct",
        f"experiment.task.entrypoint={SLEEPER}", f"+experiment.envs.SLEEPER_DIR={exp / 'sleepers'}", *extra,
        env=cluster.env, timeout=120,
    )


def _sleepers(exp: Path, count: int, timeout: float = 15) -> list[dict]:
    deadline = time.time() + timeout
    (exp / "sleepers").mkdir(parents=True, exist_ok=True)
    while time.time() < deadline:
        found = [json.loads(p.read_text()) for p in (exp / "sleepers").glob("*.json")]
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"expected {count} sleepers in {exp}, found {len(found)}")


def _record(exp: Path) -> dict:
    return json.loads((exp / "job.json").read_text())


def test_launch_query_stop_two_hosts(cluster: SSHCluster, tiny_data: Path, tmp_path: Path) -> None:
    hostfile = cluster.hostfile(tmp_path / "hostfile.txt", servers=cluster.servers[:2])
    evil = "$(touch /tmp/flagscale_ssh_pwned) a'b `id` \"q\""
    marker = tmp_path / "after_stop"
    proc = _light(cluster, tiny_data, tmp_path, hostfile, f"+train.system.wandb_exp_name='{_escape(evil)}'",
                  f"+experiment.cmds.after_stop='echo ran >> {marker}'")
    assert proc.returncode == 0, proc.stderr
    sleepers = _sleepers(tmp_path, 2)
    for sleeper in sleepers:  # the value reached each remote process literally
        assert sleeper["argv"][sleeper["argv"].index("--wandb-exp-name") + 1] == evil
    record = _record(tmp_path)
    assert [h["host"]["name"] for h in record["hosts"]] == ["127.0.0.2", "127.0.0.3"]

    query = run_py(*TINY_CONF, f"experiment.exp_dir={tmp_path}", "action=query", env=cluster.env)
    assert query.stdout.count("RUNNING") >= 3, query.stdout  # title + two hosts

    stop = run_py(*TINY_CONF, f"experiment.exp_dir={tmp_path}", "action=stop", env=cluster.env)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not pids_alive([s["pid"] for s in sleepers])
    assert not group_members([h["pgid"] for h in record["hosts"]])
    assert marker.read_text().split() == ["ran", "ran"]  # cmds.after_stop ran once on each host
    again = run_py(*TINY_CONF, f"experiment.exp_dir={tmp_path}", "action=stop", env=cluster.env)
    assert again.returncode == 0 and "already stopped" in again.stdout


def test_unreachable_host_fails_launch_and_leaves_nothing(cluster: SSHCluster, tiny_data: Path,
                                                          tmp_path: Path) -> None:
    dead_port = free_port("127.0.0.4")
    hostfile = tmp_path / "hostfile.txt"
    hostfile.write_text(f"127.0.0.2 slots=1 port={cluster.servers[0].port}\n127.0.0.4 slots=1 port={dead_port}\n")
    proc = _light(cluster, tiny_data, tmp_path, hostfile)
    assert proc.returncode != 0
    assert "127.0.0.4" in proc.stderr and "cannot connect" in proc.stderr and "Traceback" not in proc.stderr
    time.sleep(0.5)
    started = [json.loads(p.read_text())["pid"] for p in (tmp_path / "sleepers").glob("*.json")] \
        if (tmp_path / "sleepers").exists() else []
    assert not pids_alive(started)
    assert not (tmp_path / "job.json").exists()


def test_before_start_failure_names_host(cluster: SSHCluster, tiny_data: Path, tmp_path: Path) -> None:
    hostfile = cluster.hostfile(tmp_path / "hostfile.txt", servers=cluster.servers[:2])
    proc = _light(cluster, tiny_data, tmp_path, hostfile, "+experiment.cmds.before_start='exit 42'")
    assert proc.returncode != 0
    assert "127.0.0.2" in proc.stderr and "status 42" in proc.stderr


def test_host_dies_mid_job_then_stop_cleans_rest(cluster: SSHCluster, tiny_data: Path, tmp_path: Path) -> None:
    extra = cluster.start("127.0.0.5")
    hostfile = cluster.hostfile(tmp_path / "hostfile.txt", servers=[cluster.servers[0], extra])
    assert _light(cluster, tiny_data, tmp_path, hostfile).returncode == 0
    sleepers = _sleepers(tmp_path, 2)
    record = _record(tmp_path)
    extra.stop()  # the host becomes unreachable
    query = run_py(*TINY_CONF, f"experiment.exp_dir={tmp_path}", "action=query", env=cluster.env)
    assert "UNKNOWN" in query.stdout and "cannot connect" in query.stdout.replace("\n", " ")
    stop = run_py(*TINY_CONF, f"experiment.exp_dir={tmp_path}", "action=stop", env=cluster.env)
    assert stop.returncode != 0 and "127.0.0.5" in stop.stdout
    first = next(h for h in record["hosts"] if h["host"]["name"] == "127.0.0.2")
    assert not group_members([first["pgid"]])  # the reachable host was stopped
    cluster.start("127.0.0.5", extra.port)  # the host comes back: stop retries only what remains
    retry = run_py(*TINY_CONF, f"experiment.exp_dir={tmp_path}", "action=stop", env=cluster.env)
    assert retry.returncode == 0, retry.stdout
    assert "127.0.0.2" not in retry.stdout and "127.0.0.5" in retry.stdout
    assert not pids_alive([s["pid"] for s in sleepers])


def _escape(value: str) -> str:
    """Quote a value for Hydra's override grammar (single-quoted, backslash escapes)."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def test_no_shared_fs_copies_scripts_and_streams_logs(cluster: SSHCluster, tiny_data: Path, tmp_path: Path) -> None:
    hostfile = cluster.hostfile(tmp_path / "hostfile.txt", servers=cluster.servers[:2])
    proc = _light(cluster, tiny_data, tmp_path, hostfile, "+experiment.runner.no_shared_fs=true")
    assert proc.returncode == 0, proc.stderr
    _sleepers(tmp_path, 2)
    record = _record(tmp_path)
    assert record["settings"]["no_shared_fs"] is True
    for host in record["hosts"]:  # written over SFTP (loopback hosts see the same path), owner only
        script = Path(host["script"])
        assert script.read_text().startswith("#!/usr/bin/env bash")
        modes = [stat.S_IMODE(p.stat().st_mode) for p in (script, script.parent, script.parent.parent)]
        assert modes == [0o700, 0o700, 0o700], [oct(m) for m in modes]
    deadline = time.time() + 10
    logs = None
    while time.time() < deadline:
        logs = subprocess.run([sys.executable, "-m", "flagscale.cli", "logs", str(tmp_path)], capture_output=True,
                              text=True, env={**os.environ, **cluster.env}, timeout=60)
        if logs.stdout.count("sleeper") >= 2:
            break
        time.sleep(0.5)
    assert logs is not None and "[127.0.0.2] sleeper" in logs.stdout and "[127.0.0.3] sleeper" in logs.stdout
    stop = run_py(*TINY_CONF, f"experiment.exp_dir={tmp_path}", "action=stop", env=cluster.env)
    assert stop.returncode == 0, stop.stdout


def test_sftp_error_stops_started_hosts_and_records_them(cluster: SSHCluster, tiny_data: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a shared file system the second host's script cannot be written (an SFTP failure) while the
    first host has started: the first is stopped and job.json names both, so `stop` reaches everything."""
    import paramiko

    from flagscale.runner import actions

    monkeypatch.setenv("HOME", str(cluster.home))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    hostfile = cluster.hostfile(tmp_path / "hostfile.txt", servers=cluster.servers[:2])
    job = tiny_job(*tiny_overrides(tiny_data, tmp_path), *sleeper_overrides(tmp_path),
                   f"+experiment.runner.hostfile={hostfile}", "+experiment.runner.no_shared_fs=true")
    real_open = paramiko.SFTPClient.open

    def failing_open(self, filename: str, mode: str = "r", bufsize: int = -1):
        if "127.0.0.3" in filename and mode.startswith("w"):
            time.sleep(1.0)  # the other host has started by now
            raise OSError("Failure")
        return real_open(self, filename, mode, bufsize)

    monkeypatch.setattr(paramiko.SFTPClient, "open", failing_open)
    with pytest.raises(LaunchError, match="127.0.0.3"):
        actions.launch(job)
    record = _record(tmp_path)
    started = [h for h in record["hosts"] if h["pgid"]]
    assert [h["host"]["name"] for h in started] == ["127.0.0.2"]
    assert started[0]["stopped_at"] is not None
    wait_for(lambda: not group_members([started[0]["pgid"]]), 10, "the started host's job to end")


def test_nproc_capped_by_the_hosts_own_visible_devices(cluster: SSHCluster, tiny_data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The host's sessions see CUDA_VISIBLE_DEVICES=0,1; this machine's own value (0) is not the host's."""
    from flagscale.runner import actions

    gpu_host = cluster.start("127.0.0.6", env={"CUDA_VISIBLE_DEVICES": "0,1"})
    monkeypatch.setenv("HOME", str(cluster.home))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    hostfile = tmp_path / "hostfile.txt"
    hostfile.write_text(f"127.0.0.6 slots=4 port={gpu_host.port}\n")
    job = tiny_job(*tiny_overrides(tiny_data, tmp_path), *sleeper_overrides(tmp_path),
                   f"+experiment.runner.hostfile={hostfile}", "experiment.runner.nproc_per_node=4")
    record = actions.launch(job)
    try:
        assert record.info["world_size"] == 2
        assert "host 127.0.0.6: nproc_per_node capped to 2" in capsys.readouterr().out
    finally:
        actions.stop_job(tmp_path)
        gpu_host.stop()


@pytest.mark.timeout(120)
def test_test_action_ends_when_a_host_stays_unreachable(cluster: SSHCluster, tiny_data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """action=test follows the job; a host that stops answering ends it with one line naming the host, the
    other hosts stopped, instead of polling for ever."""
    from flagscale.runner import actions

    lost = cluster.start("127.0.0.7")
    monkeypatch.setenv("HOME", str(cluster.home))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(actions, "FOLLOW_INTERVAL_S", 0.5, raising=False)
    monkeypatch.setattr(actions, "UNREACHABLE_GIVE_UP_S", 3.0, raising=False)
    monkeypatch.setattr(jobs, "remember_last_job", lambda exp_dir: lost.stop())  # once the job has started
    hostfile = cluster.hostfile(tmp_path / "hostfile.txt", servers=[cluster.servers[0], lost])
    job = tiny_job(*tiny_overrides(tiny_data, tmp_path), *sleeper_overrides(tmp_path),
                   f"+experiment.runner.hostfile={hostfile}", "+experiment.runner.ssh_connect_timeout=2", action="test")
    try:
        assert actions.test(job) != 0
        out = capsys.readouterr().out.replace("\n", " ")
        assert "host 127.0.0.7" in out and "unreachable" in out and "action=stop" in out, out
        record = _record(tmp_path)
        reachable = next(h for h in record["hosts"] if h["host"]["name"] == "127.0.0.2")
        assert reachable["stopped_at"] is not None and not group_members([reachable["pgid"]])
    finally:
        cluster.start("127.0.0.7", lost.port)  # the host is back: its part of the job is stopped too
        actions.stop_job(tmp_path)
    assert not pids_alive([s["pid"] for s in _sleepers(tmp_path, 2)])
