"""The serving-engine registry and its engines, with no process started: an engine registered from a test module
plans and dry-runs without any change to the serve runner; llama.cpp's command line from vLLM's names; SGLang's real
command line (one node and several) with one line at run time where it is not installed; upstream's serve schema
(runner.deploy, engine_args_specific, two deployments of two engines) dry-runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from flagscale import jobs
from flagscale.config.hostfile import LOCALHOST
from flagscale.config.loader import load_job_config
from flagscale.exceptions import ConfigError
from flagscale.main import compose_config
from flagscale.serve import engines
from flagscale.serve.deployment import parse_deployments
from flagscale.serve.engines import engine_for
from flagscale.serve.engines.llama_cpp import LlamaCpp
from tests.conftest import REPO, run_py
from tests.helpers.jobs import dryrun_scripts

CONF = REPO / "examples" / "tiny_gpt" / "conf"


def _plan(name: str, *overrides: str, action: str = "dryrun"):
    cfg, source = compose_config(CONF, name, [*overrides, f"action={action}"])
    runner, ctx = jobs.prepare(load_job_config(cfg, source))
    return runner.plan(ctx)


def test_an_engine_registered_from_a_test_module_plans_without_runner_changes(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(engines.ENGINES, "echo", "tests.helpers.test_engine:EchoServer")
    plan = _plan("serve", f"experiment.exp_dir={tmp_path}", "serve.0.engine=echo", "~serve.0.engine_args.port",
                 "+serve.0.engine_args.directory=/srv")
    (server,) = plan.processes
    assert server.argv[1:5] == ["-m", "http.server", "8765", "--bind"]
    assert server.argv[5:] == ["127.0.0.1", "--served-model-name", "tiny_gpt", "--tensor-parallel-size", "1",
                               "--max-model-len", "128", "--max-num-seqs", "16", "--dtype", "float32",
                               "--kv-cache-memory-bytes", "134217728", "--enforce-eager", "--seed", "0",
                               "--directory", "/srv"]
    assert server.env["ECHO_CACHE"] == str(tmp_path / "cache" / "echo")
    assert plan.ready is not None and plan.ready.urls == ("http://127.0.0.1:8765/ready",)
    assert plan.info["engines"] == {"tiny_gpt": "echo"}


def test_unknown_engines_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="engine 'tgi' is not a serving engine FlagScale knows "
                                          r"\(known: vllm, llama_cpp, sglang\)"):
        _plan("serve", f"experiment.exp_dir={tmp_path}", "serve.0.engine=tgi")
    with pytest.raises(ConfigError, match="experiment.task.backend / experiment.runner.deploy.engine 'tgi'"):
        _plan("serve_llama_cpp", f"experiment.exp_dir={tmp_path}", "experiment.task.backend=tgi")


def test_llama_cpp_takes_vllm_names_and_its_own() -> None:
    (deployment,) = parse_deployments([{
        "serve_id": "m", "engine": "llama_cpp",
        "engine_args": {"model": "/m/model.gguf", "served_model_name": "tiny", "max_model_len": 256,
                        "max_num_seqs": 4, "kv_cache_dtype": "fp8", "tensor_parallel_size": 1, "dtype": "float32",
                        "enforce_eager": True, "seed": 7},
        "engine_args_specific": {"llama_cpp": {"threads": 2, "n_gpu_layers": 0}, "vllm": {"swap_space": 4}}}])
    engine = LlamaCpp()
    argv = engine.argv("/venv/bin/python", deployment, engine.endpoint(deployment, LOCALHOST))
    assert argv[0] == "/venv/bin/llama-server" or argv[0].endswith("/llama-server")
    assert argv[1:] == ["--model", "/m/model.gguf", "--alias", "tiny", "--parallel", "4", "--cache-type-k", "q8_0",
                        "--cache-type-v", "q8_0", "--seed", "7", "--threads", "2", "--n-gpu-layers", "0",
                        "--ctx-size", "1024", "--host", "127.0.0.1", "--port", "8080"]
    assert engine.dropped(deployment) == ["dtype", "enforce_eager", "tensor_parallel_size"]
    (bad,) = parse_deployments([{"serve_id": "m", "engine": "llama_cpp",
                                 "engine_args": {"model": "/m.gguf", "kv_cache_dtype": "int3"}}])
    with pytest.raises(ConfigError, match="kv_cache_dtype 'int3' has no llama.cpp counterpart"):
        engine.arguments(bad)


def test_llama_cpp_needs_a_gguf_file(tmp_path: Path) -> None:
    (hf_folder,) = parse_deployments([{"serve_id": "m", "engine": "llama_cpp",
                                       "engine_args": {"model": str(tmp_path)}}])
    assert "is not a .gguf file or a folder with one" in LlamaCpp().model_problem(hf_folder)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert LlamaCpp().model_problem(hf_folder) is None
    argv = LlamaCpp().argv("py", hf_folder, LlamaCpp().endpoint(hf_folder, LOCALHOST))
    assert argv[1:3] == ["--model", str(tmp_path / "model.gguf")]


def test_sglang_plans_its_real_command_and_refuses_to_run_where_it_is_missing(tmp_path: Path) -> None:
    one = _plan("serve", f"experiment.exp_dir={tmp_path}", "serve.0.engine=sglang")
    argv = one.processes[0].argv
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    assert argv[3:9] == ["--model-path", "outputs/tiny_gpt/hf", "--served-model-name", "tiny_gpt", "--host",
                         "127.0.0.1"] and "--context-length" in argv and "--max-running-requests" in argv
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8 type=H100\nnode2 slots=8 type=H100\n")
    two = _plan("serve", f"experiment.exp_dir={tmp_path}", "serve.0.engine=sglang", "~serve.0.engine_args.host",
                f"+experiment.runner.hostfile={hostfile}", "experiment.runner.nnodes=2",
                "+experiment.runner.master_port=5000")
    assert [p.host.name for p in two.processes] == ["node1", "node2"]
    for rank, process in enumerate(two.processes):
        assert process.argv[-6:] == ["--nnodes", "2", "--node-rank", str(rank), "--dist-init-addr", "node1:5000"]
    with pytest.raises(ConfigError, match="sglang is not installed here"):
        _plan("serve", f"experiment.exp_dir={tmp_path}", "serve.0.engine=sglang", f"serve.0.engine_args.model={REPO}",
              action="run")


def test_an_engine_that_serves_from_one_host_refuses_a_hostfile(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    with pytest.raises(ConfigError, match="llama_cpp serves from one host"):
        _plan("serve_llama_cpp", f"experiment.exp_dir={tmp_path}", f"+experiment.runner.hostfile={hostfile}",
              "experiment.runner.nnodes=2")


def test_upstream_serve_schema_with_two_engines_dry_runs(tmp_path: Path) -> None:
    proc = run_py("--config-path", str(CONF), "--config-name", "serve_two_engines", "action=dryrun",
                  f"experiment.exp_dir={tmp_path}", timeout=120)
    assert proc.returncode == 0, proc.stderr
    scripts = dryrun_scripts(tmp_path)
    vllm = (scripts / "localhost-tiny_vllm.sh").read_text()
    llama = (scripts / "localhost-tiny_llama_cpp.sh").read_text()
    assert "-m vllm.entrypoints.openai.api_server --model outputs/tiny_gpt/hf" in vllm
    assert "--dtype float32 --kv-cache-memory-bytes 134217728 --enforce-eager" in vllm  # engine_args_specific.vllm
    assert "llama-server --model outputs/tiny_gpt/gguf/model.gguf --alias tiny_gpt" in llama
    assert "--parallel 4" in llama and "--ctx-size 512" in llama and "--threads 1" in llama
    assert "--dtype" not in llama and "--enforce-eager" not in llama
    assert "(vllm) serves at http://127.0.0.1:8000/v1" in proc.stdout
    assert "(llama_cpp) serves at http://127.0.0.1:8080/v1" in proc.stdout


def test_every_registered_engine_loads() -> None:
    for name in engines.ENGINES:
        assert engine_for(name).name == name


def test_vllm_across_hosts_without_ray_runs_every_rank(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("10.0.0.1 slots=1\n10.0.0.2 slots=1\n")
    plan = _plan("serve", f"experiment.exp_dir={tmp_path}", f"+experiment.runner.hostfile={hostfile}",
                 "experiment.runner.nnodes=2", "+experiment.runner.master_port=29511",
                 "serve.0.engine_args.tensor_parallel_size=2", "+serve.0.engine_args.distributed_executor_backend=mp",
                 "~serve.0.engine_args.host")
    assert [(p.host.name, p.label) for p in plan.processes] == [("10.0.0.1", "tiny_gpt"), ("10.0.0.2", "tiny_gpt")]
    for rank, process in enumerate(plan.processes):
        assert process.argv[1:3] == ["-m", "flagscale.serve.vllm_serve"]
        tail = ["--nnodes", "2", "--node-rank", str(rank), "--master-addr", "10.0.0.1", "--master-port", "29511"]
        assert process.argv[-len(tail) - rank:len(process.argv) - rank] == tail
        assert ("--headless" in process.argv) == (rank == 1)
        assert process.env["VLLM_HOST_IP"] == f"10.0.0.{rank + 1}"
    assert plan.ready is not None and plan.ready.urls[0] == "http://10.0.0.1:8000/health"
    assert not any("ray" in " ".join(p.argv) for p in plan.processes)


def test_replicas_are_servers_round_the_hosts_each_on_its_own_port(tmp_path: Path) -> None:
    one = _plan("serve_llama_cpp", f"experiment.exp_dir={tmp_path}", "+serve.0.resources.num_replicas=3")
    assert [(p.label, p.argv[p.argv.index("--port") + 1]) for p in one.processes] == [
        ("tiny_gpt-0", "8080"), ("tiny_gpt-1", "8081"), ("tiny_gpt-2", "8082")]
    assert one.ready is not None and len(one.ready.urls) == 6 and sorted(one.info["urls"]) == [
        "tiny_gpt-0", "tiny_gpt-1", "tiny_gpt-2"]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("10.0.0.1 slots=1\n10.0.0.2 slots=1\n")
    two = _plan("serve_llama_cpp", f"experiment.exp_dir={tmp_path}", f"+experiment.runner.hostfile={hostfile}",
                "experiment.runner.nnodes=2", "~serve.0.engine_args.host", "+serve.0.resources.num_replicas=4")
    assert [(p.host.name, p.argv[p.argv.index("--port") + 1]) for p in two.processes] == [
        ("10.0.0.1", "8080"), ("10.0.0.2", "8080"), ("10.0.0.1", "8081"), ("10.0.0.2", "8081")]
    assert two.info["urls"]["tiny_gpt-1"] == "http://10.0.0.2:8080/v1"
    with pytest.raises(ConfigError, match="num_replicas must be a whole number >= 1"):
        parse_deployments([{"serve_id": "m", "engine_args": {"model": "/m"}, "resources": {"num_replicas": 0}}])
