"""The experiment-level schema (where and how a job runs). Unknown keys are errors that
suggest the closest known key; the task level (`train.*`, `serve`, ...) is validated by
each task's runner against its engine's own argument names."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flagscale.exceptions import ConfigError

ACTIONS = ("run", "dryrun", "test", "stop", "query", "auto_tune")
TASK_TYPES = ("train", "inference", "serve")


@dataclass(slots=True, kw_only=True)
class TaskSpec:
    type: str = "train"
    """What runs: train, inference or serve."""
    backend: str = "megatron"
    """The engine: megatron for train, vllm for inference/serve."""
    entrypoint: str | None = None
    """The program each rank runs (default: the task's own, e.g. flagscale/train/train_gpt.py)."""

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise ConfigError(f"experiment.task.type '{self.type}' is not one of {', '.join(TASK_TYPES)}")


@dataclass(slots=True, kw_only=True)
class RunnerConfig:
    backend: str = "torchrun"
    """How processes start on each host: torchrun, or direct (the entrypoint once per host, no torchrun)."""
    nnodes: int | None = None
    """How many hosts of the hostfile to use (default: all of them)."""
    nproc_per_node: int | None = None
    """Processes per host (default: the host's slots, or 1 without a hostfile); capped by slots."""
    hostfile: str | None = None
    """Hostfile path (relative: from the current directory, else beside the config); none: this machine."""
    ssh_port: int | None = None
    """Default SSH port (a host's port= wins; else ~/.ssh/config, else 22)."""
    ssh_strict_host_key_checking: bool = True
    """Refuse hosts whose key is not in known_hosts (set false to accept new keys)."""
    ssh_connect_timeout: float = 10.0
    """Seconds to wait for each SSH connection."""
    master_addr: str | None = None
    """Rendezvous address (default: the first host)."""
    master_port: int | None = None
    """Rendezvous port (default: a port found free on the master host at launch)."""
    no_shared_fs: bool = False
    """Hosts do not share exp_dir: scripts are copied over SFTP and logs stay on each host."""
    python: str | None = None
    """Python interpreter on the hosts (default: the one running FlagScale)."""
    stop_timeout: float = 15.0
    """Seconds between SIGTERM and SIGKILL on stop."""
    rdzv_backend: str = "static"
    """torchrun rendezvous: static (master addr/port) or c10d."""
    device_type_specific: dict[str, Any] = field(default_factory=dict)
    """Per host type runner settings, e.g. {A100: {nproc_per_node: 8}}."""

    def __post_init__(self) -> None:
        for name in ("nnodes", "nproc_per_node", "ssh_port", "master_port"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"experiment.runner.{name} must be a positive integer, got {value!r}")
        if self.backend not in ("torchrun", "direct"):
            raise ConfigError(f"experiment.runner.backend must be 'torchrun' or 'direct', got '{self.backend}'")
        if self.rdzv_backend not in ("static", "c10d"):
            raise ConfigError("experiment.runner.rdzv_backend must be 'static' or 'c10d'")


@dataclass(slots=True, kw_only=True)
class CmdsConfig:
    before_start: str | list[str] | None = None
    """Shell run on each host before the job (e.g. `source venv/bin/activate`); failure aborts the launch."""
    after_stop: str | list[str] | None = None
    """Shell run on each host after `stop` ended the job."""

    def lines(self, which: str) -> list[str]:
        value = getattr(self, which)
        if value is None:
            return []
        return [value] if isinstance(value, str) else [str(v) for v in value]


@dataclass(slots=True, kw_only=True)
class ExperimentConfig:
    exp_name: str = "default"
    """A name for the experiment (shown in records and logs)."""
    exp_dir: str = "outputs"
    """Where the job record, logs, checkpoints and results go."""
    task: TaskSpec = field(default_factory=TaskSpec)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    envs: dict[str, Any] = field(default_factory=dict)
    """Environment for every process; device_type_specific/node_specific layers override it."""
    cmds: CmdsConfig = field(default_factory=CmdsConfig)
    auto_tuner: dict[str, Any] | None = None
    """Search space and controls for action=auto_tune."""


def build(cls: type, data: Mapping[str, Any] | None, path: str) -> Any:
    """Instantiate a config dataclass from a mapping; unknown keys and wrong types are ConfigErrors."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(unknown_key_message(f"{path}.{key}", key, list(fields)))
        kwargs[key] = _convert(hints[key], value, f"{path}.{key}")
    return cls(**kwargs)


def unknown_key_message(dotted: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"
    return f"unknown key '{dotted}'{hint}"


def _convert(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return build(hint, value, path)
    allowed = _allowed_types(hint)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not any(_isinstance(value, t) for t in allowed):
        names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed if t is not type(None))
        raise ConfigError(f"{path} must be {names}, got {value!r}")
    return value


def _allowed_types(hint: Any) -> tuple[Any, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(typing.get_origin(a) or a for a in typing.get_args(hint))
    return (typing.get_origin(hint) or hint,)


def _isinstance(value: Any, kind: Any) -> bool:
    if kind is Any:
        return True
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is dict:
        return isinstance(value, Mapping)
    return isinstance(value, kind)
