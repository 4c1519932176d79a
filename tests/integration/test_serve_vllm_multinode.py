"""vLLM across two hosts without Ray, for real: the tiny model with tensor parallel size 2 over two network-
namespace hosts reached by SSH (vLLM's multiprocessing executor, `--nnodes 2`, the second host `--headless`),
started by run.py's serve action; the `openai` client's greedy answers equal the single-host server's, and `stop`
leaves nothing on either host. (Each namespace has only lo and one veth on 10.250.78.0/24; nothing leaves them.)"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO, group_members, pids_alive
from tests.helpers.netns import NetnsHosts, netns_unavailable
from tests.helpers.requires import need
from tests.helpers.sshd import SSHCluster
from tests.integration.test_convert import tiny_hf_model
from tests.integration.test_serve_vllm import flagscale, free_port, quiet_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PROMPTS = ("Once upon a time, there was a little", "The little dog ran to the")
GLOO_IFNAME = "export GLOO_SOCKET_IFNAME=$(ls /sys/class/net | grep -v ^lo$ | head -n 1)"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory):
    reason = netns_unavailable()
    need(reason is None, f"network namespaces cannot be created here: {reason}")
    need(importlib.util.find_spec("vllm") is not None, "vLLM is not installed (install-requirements.sh --env all)")
    netns = NetnsHosts(SSHCluster(tmp_path_factory.mktemp("mp_ssh")), subnet=78)
    try:
        netns.create()
        yield netns
    finally:
        netns.destroy()


def greedy(url: str) -> list[str]:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="none")
    return [client.completions.create(model="tiny_gpt", prompt=p, max_tokens=16, temperature=0).choices[0].text
            for p in PROMPTS]


def test_tensor_parallel_across_two_hosts_answers_as_one_host(hosts: NetnsHosts, tiny_data: Path,
                                                              tmp_path_factory: pytest.TempPathFactory,
                                                              tmp_path: Path) -> None:
    model = tiny_hf_model(tmp_path_factory, tiny_data)
    single, exp = tmp_path / "single", tmp_path / "multi"
    short = Path(tempfile.mkdtemp(prefix="fsmp", dir="/tmp"))  # vLLM's IPC sockets live there (107-byte paths)
    env = {**quiet_env(single), "TMPDIR": str(short)}
    one = flagscale("serve", "tiny_gpt", "--model-path", str(model), "--port", str(free_port()),
                    f"experiment.exp_dir={single}", env=env)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    try:
        expected = greedy(json.loads((single / "job.json").read_text())["info"]["urls"]["tiny_gpt"])
    finally:
        assert flagscale("stop", str(single), env=env, timeout=120).returncode == 0

    head, worker = hosts.addresses
    common = ["--config-path", str(REPO / "examples/tiny_gpt/conf"), "--config-name", "serve",
              f"experiment.exp_dir={exp}", f"+experiment.runner.hostfile={hosts.hostfile(tmp_path / 'hosts')}",
              "experiment.runner.nnodes=null", f"serve.0.engine_args.model={model}", "~serve.0.engine_args.host",
              "serve.0.engine_args.tensor_parallel_size=2", "+serve.0.engine_args.distributed_executor_backend=mp",
              f"+experiment.cmds.before_start='{GLOO_IFNAME}'", "+experiment.envs.VLLM_CPU_OMP_THREADS_BIND=nobind",
              f"+experiment.envs.VLLM_CACHE_ROOT={exp / 'cache'}", f"+experiment.envs.TMPDIR={short}",
              "serve.0.ready_timeout_s=400"]
    run_env = {**os.environ, **hosts.ssh.env}
    run = subprocess.run(hosts.exec_argv(0, [sys.executable, str(REPO / "run.py"), *common, "action=run"]),
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=run_env)
    record = json.loads((exp / "job.json").read_text()) if (exp / "job.json").is_file() else {"hosts": []}
    try:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert f"serving tiny_gpt: http://{head}:8000/v1" in run.stdout
        assert [h["host"]["name"] for h in record["hosts"]] == [head, worker]
        scripts = [Path(h["script"]).read_text() for h in record["hosts"]]
        assert all("-m flagscale.serve.vllm_serve" in s and "--nnodes 2" in s for s in scripts)
        assert "--headless" in scripts[1] and "--headless" not in scripts[0]
        answers = subprocess.run(hosts.exec_argv(0, [sys.executable, "-c", (
            "import json, sys; sys.path.insert(0, sys.argv[1]); "
            "from tests.integration.test_serve_vllm_multinode import greedy; print(json.dumps(greedy(sys.argv[2])))"),
            str(REPO), f"http://{head}:8000/v1"]), capture_output=True, text=True, timeout=120)
        assert answers.returncode == 0, answers.stderr[-2000:]
        assert json.loads(answers.stdout.strip().splitlines()[-1]) == expected
    finally:
        stop = subprocess.run(hosts.exec_argv(0, [sys.executable, str(REPO / "run.py"), *common, "action=stop"]),
                              cwd=REPO, capture_output=True, text=True, timeout=180, env=run_env)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not group_members([h["pgid"] for h in record["hosts"]])
    for index in (0, 1):  # only the sshd listeners are left in the namespaces
        left = [p for p in pids_alive(hosts.pids(index)) if Path(f"/proc/{p}/exe").resolve().name != "sshd"]
        assert not left, [Path(f"/proc/{p}/cmdline").read_text() for p in left]
    shutil.rmtree(short, ignore_errors=True)
