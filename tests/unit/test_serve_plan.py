"""Serve/inference planning with no process started: deployment validation, engine argv by the shared
flattening rules, endpoints, the Ray cluster commands, CLI option overrides, the Megatron->HF layout,
and the rendered dryrun of every serving example (tiny_gpt, qwen, deepseek_r1 multi-host)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flagscale.config.hostfile import LOCALHOST, Host
from flagscale.exceptions import ConfigError
from flagscale.serve.deployment import Resources, parse_deployments
from flagscale.serve.engines.vllm import VLLM
from flagscale.serve.overrides import hydra_value, parse_engine_args, serve_overrides
from flagscale.serve.ray_cluster import RayCluster
from flagscale.spec.plan import Plan, ProcessSpec
from tests.conftest import REPO, run_py
from tests.helpers.jobs import dryrun_scripts

NODE1 = Host(name="10.0.0.1", slots=8, type="H100")
NODE2 = Host(name="10.0.0.2", slots=8, type="H100")


def endpoint(deployment, host: Host):
    return VLLM().endpoint(deployment, host)


def server_argv(python: str, deployment, host: Host, ray: bool) -> list[str]:
    return VLLM().argv(python, deployment, endpoint(deployment, host), nodes=2 if ray else 1)


def _one(**overrides) -> dict:
    return {"serve_id": "m", "engine": "vllm", "engine_args": {"model": "/models/m"}, **overrides}


def test_deployments_parse_and_reject_with_the_fix() -> None:
    (deployment,) = parse_deployments([_one(resources={"num_gpus": 8})])
    assert deployment.resources.num_gpus == 8 and deployment.ready_timeout_s == 600
    problems = {
        "did you mean 'engine_args'": [_one(engine_arg={})],
        "did you mean 'num_gpus'": [_one(resources={"num_gpu": 1})],
        "engine_args.model is required": [_one(engine_args={"port": 1})],
        "has no serve_id": [{"engine_args": {"model": "x"}}],
        "used twice": [_one(), _one()],
        "must be a list of deployments": [],
    }
    for message, task in problems.items():
        with pytest.raises(ConfigError, match=message):
            parse_deployments(task)


def test_engine_args_pass_through_by_shared_flatten_rules() -> None:
    (deployment,) = parse_deployments([_one(engine_args={
        "model": "/m", "tensor_parallel_size": 2, "enforce_eager": True, "enable_prefix_caching": False,
        "served_model_name": ["a", "b"], "quantization": None, "limits": {"max_num_seqs": 4},
        "compilation_config": '{"level": 0}', "some_future_vllm_option": "kept"})])
    argv = server_argv("py", deployment, LOCALHOST, ray=False)
    assert argv[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[3:] == ["--model", "/m", "--tensor-parallel-size", "2", "--enforce-eager", "--served-model-name",
                        "a", "b", "--max-num-seqs", "4", "--compilation-config", '{"level": 0}',
                        "--some-future-vllm-option", "kept", "--host", "127.0.0.1", "--port", "8000",
                        "--no-enable-prefix-caching"]  # on by default in vLLM: false is spelled out, not dropped


def test_a_leaf_set_twice_follows_argparse_last_wins() -> None:
    (deployment,) = parse_deployments([_one(engine_args={"model": "/m", "a": {"dtype": "x"}, "dtype": "y"})])
    argv = server_argv("py", deployment, LOCALHOST, ray=False)
    assert argv.count("--dtype") == 1 and argv[argv.index("--dtype") + 1] == "y"


def test_endpoints() -> None:
    local = parse_deployments([_one()])[0]
    assert endpoint(local, LOCALHOST).base_url == "http://127.0.0.1:8000"
    assert endpoint(local, NODE1).bind_host == "10.0.0.1"
    wildcard = parse_deployments([_one(engine_args={"model": "x", "host": "0.0.0.0", "port": 9})])[0]
    assert endpoint(wildcard, NODE1).ready_urls == ("http://10.0.0.1:9/health", "http://10.0.0.1:9/v1/models")
    assert endpoint(wildcard, LOCALHOST).connect_host == "127.0.0.1"
    bad = parse_deployments([_one(engine_args={"model": "x", "port": "http"})])[0]
    with pytest.raises(ConfigError, match="port must be a port number"):
        endpoint(bad, LOCALHOST)


def test_multi_host_server_runs_on_ray() -> None:
    (deployment,) = parse_deployments([_one()])
    assert server_argv("py", deployment, NODE1, ray=True)[-2:] == ["--distributed-executor-backend", "ray"]
    (mp,) = parse_deployments([_one(engine_args={"model": "x", "distributed_executor_backend": "mp"})])
    assert server_argv("py", mp, NODE1, ray=True)[:3] == ["py", "-m", "flagscale.serve.vllm_serve"]
    assert VLLM().rank_args(2, 1, "10.0.0.1", 29501) == ["--nnodes", "2", "--node-rank", "1", "--master-addr",
                                                          "10.0.0.1", "--master-port", "29501", "--headless"]
    (uni,) = parse_deployments([_one(engine_args={"model": "x", "distributed_executor_backend": "uni"})])
    with pytest.raises(ConfigError, match="distributed_executor_backend=uni cannot span hosts"):
        VLLM().multi_host_mode(uni)


def test_ray_cluster_commands() -> None:
    cluster = RayCluster(hosts=(NODE1, NODE2), port=6400, python="py",
                         resources=Resources(num_cpus=16, object_store_memory=10**9, custom={"big": 1}))
    head = cluster.node_argv(NODE1)
    assert head[:5] == ["py", "-m", "ray.scripts.scripts", "start", "--block"]
    assert "--head" in head and head[head.index("--port") + 1] == "6400" and "--address" not in head
    assert head[head.index("--num-gpus") + 1] == "8"  # the host's slots on a typed host
    assert head[head.index("--resources") + 1] == '{"big": 1}'
    worker = cluster.node_argv(NODE2)
    assert worker[:6] == ["py", "-m", "flagscale.serve.ray_node", "join", "--address", "10.0.0.1:6400"]
    start = worker[worker.index("--") + 1:]
    assert "--head" not in start and start[start.index("--node-ip-address") + 1] == "10.0.0.2"
    wait = cluster.wait_argv(["server"])
    assert wait[3:] == ["wait", "--address", "10.0.0.1:6400", "--nodes", "2", "--timeout", "300.0", "--", "server"]
    assert cluster.node_env(NODE2)["VLLM_HOST_IP"] == "10.0.0.2"


def test_cli_options_become_hydra_overrides() -> None:
    assert serve_overrides("/a b/it's", 8001, '{"max-num-seqs": 8, "cc": {"level": 0}, "l": [1, "x", null]}') == [
        "++serve.0.engine_args.max_num_seqs=8", "++serve.0.engine_args.cc='{\"level\": 0}'",
        "++serve.0.engine_args.l=[1,'x',null]", "++serve.0.engine_args.model='/a b/it\\'s'",
        "++serve.0.engine_args.port=8001"]
    assert hydra_value(True) == "true" and hydra_value("a\\") == "'a\\\\'"
    for bad, message in (("{", "not valid JSON"), ("[1]", "must be a JSON object"), ('{"a b": 1}', "not a vLLM")):
        with pytest.raises(ConfigError, match=message):
            parse_engine_args(bad)


def test_labelled_processes_get_their_own_scripts() -> None:
    spec = ProcessSpec(host=NODE1, node_rank=0, argv=["x"], cwd="/", log_path="/l/a.log", label="ray")
    plan = Plan(task_type="serve", exp_dir="/e", run_id="r", log_dir="/l", processes=[spec])
    assert plan.script_path(spec) == "/l/scripts/10.0.0.1-ray.sh"


def test_qkv_layout_round_trips_with_grouped_query_attention() -> None:
    import torch

    from tools.checkpoint.llama_mapping import merge_qkv, split_qkv

    heads, groups, dim, hidden = 8, 2, 4, 16
    q, k, v = torch.randn(heads * dim, hidden), torch.randn(groups * dim, hidden), torch.randn(groups * dim, hidden)
    fused = merge_qkv(q, k, v, groups, dim)
    # Megatron's order: group 0's four query heads, its key, its value, then group 1's
    assert torch.equal(fused[4 * dim:5 * dim], k[:dim]) and torch.equal(fused[6 * dim:7 * dim], q[4 * dim:5 * dim])
    for got, want in zip(split_qkv(fused, heads, groups, dim), (q, k, v)):
        assert torch.equal(got, want)


# --- dryrun of the examples (run.py in a subprocess, as a user types it) ---------------------------

def _dryrun(conf: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_py("--config-path", f"examples/{conf}/conf", "--config-name", "serve", "action=dryrun",
                  f"experiment.exp_dir={tmp_path}", *overrides, timeout=120)


def test_tiny_gpt_serve_dryrun(tmp_path: Path) -> None:
    proc = _dryrun("tiny_gpt", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "serves at http://127.0.0.1:8000/v1" in proc.stdout and "dryrun: nothing was started" in proc.stdout
    script = (dryrun_scripts(tmp_path) / "localhost-tiny_gpt.sh").read_text()
    assert "-m vllm.entrypoints.openai.api_server --model outputs/tiny_gpt/hf" in script
    assert "--host 127.0.0.1 --port 8000" in script and "--enforce-eager" in script
    assert f"export VLLM_CACHE_ROOT={tmp_path}/cache/vllm" in script and not (tmp_path / "job.json").exists()


def test_serve_errors_are_one_line(tmp_path: Path) -> None:
    cases = {
        ("+serve.0.engine_arg={}",): "did you mean 'engine_args'",
        ("serve.0.engine_args.model=/nonexistent/x/hf", "action=run"): "model /nonexistent/x/hf does not exist",
        ("serve.0.engine_args.port=http",): "engine_args.port must be a port number",
    }
    for overrides, message in cases.items():
        proc = _dryrun("tiny_gpt", tmp_path, *overrides)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_gpu_examples_compose_and_dryrun(tmp_path: Path) -> None:
    qwen = _dryrun("qwen", tmp_path / "qwen")
    assert qwen.returncode == 0, qwen.stderr
    assert "--tensor-parallel-size 2" in qwen.stdout and "serves at http://127.0.0.1:8000/v1" in qwen.stdout
    deepseek = _dryrun("deepseek_r1", tmp_path / "ds")
    assert deepseek.returncode == 0, deepseek.stderr
    scripts = dryrun_scripts(tmp_path / "ds")
    assert sorted(p.name for p in scripts.iterdir()) == ["node1-deepseek-r1.sh", "node1-ray.sh", "node2-ray.sh"]
    head, worker = (scripts / "node1-ray.sh").read_text(), (scripts / "node2-ray.sh").read_text()
    assert "ray.scripts.scripts start --block --disable-usage-stats --head --port 6379" in head
    assert "ray_node join --address node1:6379" in worker
    assert "--address node1:6379 --node-ip-address node2 --num-gpus 8" in worker
    server = (scripts / "node1-deepseek-r1.sh").read_text()
    assert "ray_node wait --address node1:6379 --nodes 2" in server
    assert "--tensor-parallel-size 8 --pipeline-parallel-size 2" in server
    assert "--distributed-executor-backend ray" in server
    assert "source /opt/flagscale/.venv/bin/activate" in server and "NCCL_SOCKET_IFNAME=eth0" in server
    assert "serves at http://node1:8000/v1" in deepseek.stdout


def test_flagscale_serve_finds_examples_by_name(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "flagscale.cli", "serve", "deepseek_r1", "--dryrun", "--port", "9000",
                           "--engine-args", '{"max_num_seqs": 2}', f"experiment.exp_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    server = (dryrun_scripts(tmp_path) / "node1-deepseek-r1.sh").read_text()
    assert "--port 9000" in server and "--max-num-seqs 2" in server
    bad = subprocess.run([sys.executable, "-m", "flagscale.cli", "serve", "tiny_gpt", "--dryrun", "--engine-args", "{"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "--engine-args is not valid JSON" in bad.stderr


def test_inference_dryrun_and_errors(tmp_path: Path) -> None:
    base = ("--config-path", "examples/tiny_gpt/conf", "--config-name", "inference", f"experiment.exp_dir={tmp_path}")
    proc = run_py(*base, "action=dryrun", timeout=120)
    assert proc.returncode == 0, proc.stderr
    (script,) = dryrun_scripts(tmp_path).glob("*.sh")
    text = script.read_text()
    assert "-m flagscale.inference.run_inference --config-json" in text
    config = json.loads(text.split("--config-json ")[1].split("\n")[0].strip("'"))
    assert config["llm"]["model"] == "outputs/tiny_gpt/hf"
    assert config["generate"]["sampling"]["temperature"] == 0.0
    assert config["output_path"].startswith(f"{tmp_path}/outputs/")
    for overrides, message in ((["inference.generate.prompts=[]"], "needs prompts"),
                               (["+inference.generate.prompt_file=x"], "did you mean 'prompts_file'"),
                               (["+inference.generate.prompts_file=/nonexistent.txt"],
                                "/nonexistent.txt does not exist")):
        bad = run_py(*base, "action=dryrun", *overrides, timeout=120)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr


def test_ray_node_steps_need_a_command_and_an_address() -> None:
    from flagscale.serve import ray_node

    with pytest.raises(SystemExit, match="after '--'"):
        ray_node.main(["join", "--address", "h:1"])
    with pytest.raises(SystemExit, match="must be HOST:PORT"):
        ray_node.main(["join", "--address", "nohost", "--", "true"])
    with pytest.raises(SystemExit) as exited:  # nothing answers there: one line, status 1, after the timeout
        ray_node.main(["join", "--address", "127.0.0.1:1", "--timeout", "0", "--", "true"])
    assert exited.value.code == 1


def test_ray_nodes_bind_their_own_address() -> None:
    """Every node passes --node-ip-address: an IP as written, a name resolved here (kept as written if it does
    not resolve); vLLM on that node is told the same address."""
    named = Host(name="localhost", slots=8, type="H100", port=2201)
    unknown = Host(name="node-x.invalid", slots=8, type="H100", port=2202)
    cluster = RayCluster(hosts=(named, unknown), port=6400, python="py", resources=Resources(), dashboard_port=8265)
    head, worker = cluster.node_argv(named), cluster.node_argv(unknown)
    assert head[head.index("--node-ip-address") + 1] == "127.0.0.1"
    assert head[head.index("--port") + 1] == "6400" and head[head.index("--dashboard-port") + 1] == "8265"
    start = worker[worker.index("--") + 1:]
    assert start[start.index("--node-ip-address") + 1] == "node-x.invalid"
    assert cluster.node_env(named)["VLLM_HOST_IP"] == "127.0.0.1" and "VLLM_HOST_IP" not in cluster.node_env(unknown)


def test_serve_examples_do_not_listen_on_every_interface() -> None:
    """engine_args.host: 0.0.0.0 only with a comment on that line saying why the example needs it."""
    unexplained = []
    for path in sorted(REPO.glob("examples/*/conf/serve/*.yaml")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            value, _, comment = line.partition("#")
            if value.strip().replace(" ", "") in ("host:0.0.0.0", "host:'0.0.0.0'", 'host:"0.0.0.0"', "host:'::'") \
                    and not comment.strip():
                unexplained.append(f"{path.relative_to(REPO)}:{number}")
    assert not unexplained, unexplained
