"""SGLang: `python -m sglang.launch_server`, planned and dry-run with its real command line; it is not installed
on this project's CPU machines (its kernels have no CPU build on the package index), so `run` ends in one line.

vLLM's names map to SGLang's where it has the same setting (`VLLM_NAMES`); the rest pass through by SGLang's own
names. Several nodes: the server on every node, with `--nnodes N --node-rank R --dist-init-addr MASTER:PORT`.
"""

from __future__ import annotations

from typing import Any

from flagscale.serve.deployment import Deployment
from flagscale.serve.engines.base import Endpoint, ServingEngine, flags

VLLM_NAMES = {"model": "model_path", "seed": "random_seed", "max_model_len": "context_length",
              "max_num_seqs": "max_running_requests", "uvicorn_log_level": "log_level",
              "tensor_parallel_size": "tp_size", "pipeline_parallel_size": "pp_size",
              "show_hidden_metrics_for_version": "enable_metrics"}


class SGLang(ServingEngine):
    name = "sglang"
    default_port = 30000
    multi_host = "ranks"
    python_module = "sglang"
    ready_paths = ("/health", "/v1/models")
    install_hint = ("SGLang needs a GPU build (pip install 'sglang[all]' on a CUDA machine); serve with vllm or "
                    "llama_cpp here")

    def argv(self, python: str, deployment: Deployment, where: Endpoint, *, nodes: int = 1,
             entrypoint: str | None = None) -> list[str]:
        args = self.arguments(deployment)
        args["host"], args["port"] = where.bind_host, where.port
        return [python, "-m", entrypoint or "sglang.launch_server", *flags(deployment, args)]

    def model_hint(self, model: str) -> str:
        return "point engine_args.model at a Hugging Face model folder"

    def arguments(self, deployment: Deployment) -> dict[str, Any]:
        return {VLLM_NAMES.get(name, name): value for name, value in deployment.engine_args.items()}


    def rank_args(self, nnodes: int, node_rank: int, master: str, port: int) -> list[str]:
        return ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--dist-init-addr", f"{master}:{port}"]
