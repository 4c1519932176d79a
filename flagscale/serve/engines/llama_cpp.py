"""llama.cpp: its own OpenAI-compatible server, `llama-server` (what upstream FlagScale launches), on a GGUF file.

`install/install-requirements.sh --llama-cpp-backend cpu` builds llama-server from the llama.cpp source tree that
PyPI's llama-cpp-python source distribution carries, and puts it beside the environment's python; a HF folder
converts to GGUF with tools/checkpoint/convert_hf_to_gguf.py. engine_args given by vLLM's names are mapped where
llama.cpp has the same setting (`VLLM_NAMES`), vLLM-only performance knobs are dropped with a note, and everything
else passes through by llama.cpp's own names (`threads`, `n_gpu_layers`, `batch_size`, ...), dashed as its
command line spells them; llama-server rejects one it does not know, and the ready-wait shows its message.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from flagscale.exceptions import ConfigError
from flagscale.serve.deployment import Deployment
from flagscale.serve.engines.base import Endpoint, ServingEngine, flags

SERVER = "llama-server"
VLLM_NAMES = {  # vLLM's name -> llama-server's (the same setting)
    "served_model_name": "alias", "max_num_seqs": "parallel", "rope_theta": "rope_freq_base", "seed": "seed",
    "ssl_keyfile": "ssl_key_file", "ssl_certfile": "ssl_cert_file", "disable_uvicorn_access_log": "log_disable",
    "show_hidden_metrics_for_version": "metrics", "max_num_batched_tokens": "batch_size", "api_key": "api_key",
}
VLLM_ONLY = {  # vLLM settings llama-server has no counterpart for: dropped, with a note
    "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "dtype", "enforce_eager",
    "kv_cache_memory_bytes", "gpu_memory_utilization", "swap_space", "block_size", "enable_chunked_prefill",
    "enable_prefix_caching", "trust_remote_code", "distributed_executor_backend", "max_seq_len_to_capture",
    "compilation_config", "uvicorn_log_level", "disable_log_requests", "disable_log_stats", "tokenizer",
}
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


class LlamaCpp(ServingEngine):
    name = "llama_cpp"
    default_port = 8080
    ready_paths = ("/health", "/v1/models")
    install_hint = "build it with: bash install/install-requirements.sh --env inference --llama-cpp-backend cpu"
    memory_knobs = frozenset({"max_num_seqs", "parallel", "max_model_len", "ctx_size", "batch_size", "ubatch_size",
                              "max_num_batched_tokens"})

    def argv(self, python: str, deployment: Deployment, where: Endpoint, *, nodes: int = 1,
             entrypoint: str | None = None) -> list[str]:
        if nodes > 1:
            raise ConfigError(f"deployment {deployment.serve_id}: llama.cpp serves from one host; remove the "
                              "hostfile or set experiment.runner.nnodes=1")
        args = self.arguments(deployment)
        model = gguf_file(str(args.pop("model")))
        args["host"], args["port"] = where.bind_host, where.port
        program = entrypoint or server_path(python)
        return [program, "--model", model, *flags(deployment, args)]

    def arguments(self, deployment: Deployment) -> dict[str, Any]:
        """vLLM's names mapped to llama-server's; max_model_len (per request, as in vLLM) becomes the context
        size of all parallel slots together, so every slot holds a whole request."""
        args: dict[str, Any] = {}
        given = dict(deployment.engine_args)
        for name, value in given.items():
            if name in VLLM_ONLY:
                continue
            if name == "kv_cache_dtype":
                args.update(_kv_cache_type(deployment, value))
            elif name != "max_model_len":
                args[VLLM_NAMES.get(name, name)] = value
        if "max_model_len" in given and "ctx_size" not in args:
            args["ctx_size"] = int(given["max_model_len"]) * int(args.get("parallel") or 1)
        return args

    def dropped(self, deployment: Deployment) -> list[str]:
        """The vLLM-only settings of a deployment that llama.cpp does not use."""
        return sorted(set(deployment.engine_args) & VLLM_ONLY)

    def context_per_request(self, deployment: Deployment) -> int | None:
        """A slot's share of ctx_size (llama-server splits the context between its parallel slots)."""
        args = self.arguments(deployment)
        slots = int(args.get("parallel") or 1)
        if args.get("ctx_size"):
            return int(args["ctx_size"]) // slots
        trained = _gguf_field(gguf_file(str(deployment.engine_args["model"])), "context_length")
        return int(trained) // slots if trained else None

    def vocab_size(self, deployment: Deployment) -> int | None:
        tokens = _gguf_field(gguf_file(str(deployment.engine_args["model"])), "tokenizer.ggml.tokens")
        return len(tokens) if tokens else None

    def served_name(self, deployment: Deployment) -> str:
        args = deployment.engine_args
        return str(args.get("served_model_name") or args.get("alias") or Path(str(args["model"])).stem)

    def model_problem(self, deployment: Deployment) -> str | None:
        model = Path(str(deployment.engine_args["model"])).expanduser()
        if (model.is_file() and model.suffix == ".gguf") or (model.is_dir() and any(model.glob("*.gguf"))):
            return None
        what = "does not exist" if not model.exists() else "is not a .gguf file or a folder with one"
        return (f"deployment {deployment.serve_id}: engine_args.model {model} {what}; llama.cpp serves GGUF files: "
                f"python tools/checkpoint/convert_hf_to_gguf.py --input HF_FOLDER --output {model}")

    def missing(self, python: str) -> str | None:
        if Path(server_path(python)).is_file() or shutil.which(SERVER):
            return None
        return f"llama.cpp's {SERVER} is not installed here (looked beside {python} and on PATH); {self.install_hint}"


def server_path(python: str) -> str:
    """llama-server beside the environment's python (where the install script puts it), else on PATH."""
    beside = Path(python).parent / SERVER
    return str(beside) if beside.is_file() else shutil.which(SERVER) or str(beside)


def gguf_file(model: str) -> str:
    """The model as a .gguf file: itself, or the first .gguf in the folder it names."""
    path = Path(model).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        return str(found[0]) if found else model
    return model


def _gguf_field(path: str, name: str) -> Any:
    """A metadata field of a GGUF file (`context_length` under its architecture's prefix), or None."""
    if not Path(path).is_file():
        return None
    try:
        from gguf import GGUFReader
    except ModuleNotFoundError:
        return None
    reader = GGUFReader(path)
    if name == "context_length":
        arch = reader.fields.get("general.architecture")
        name = f"{arch.contents()}.context_length" if arch else name
    found = reader.fields.get(name)
    return found.contents() if found else None


def _kv_cache_type(deployment: Deployment, value: Any) -> dict[str, str]:
    if value in KV_CACHE_TYPES:
        return {"cache_type_k": value, "cache_type_v": value}
    if value in ("fp8", "fp8_e4m3", "fp8_e5m2"):
        return {"cache_type_k": "q8_0", "cache_type_v": "q8_0"}
    raise ConfigError(f"deployment {deployment.serve_id}: kv_cache_dtype {value!r} has no llama.cpp counterpart "
                      f"(llama.cpp: {', '.join(KV_CACHE_TYPES)}; fp8 maps to q8_0)")
