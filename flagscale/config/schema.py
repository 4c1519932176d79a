"""The experiment-level schema (where and how a job runs), in upstream FlagScale's shape.

Unknown keys are errors that suggest the closest known key; keys for things this project does not
run (another task, runner type or serving mode) end in one line naming the key and what is supported.
The task level (`train.*`, `serve`, ...) is validated by each task's runner against its engine's own
argument names."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flagscale.config.sbatch import check_extra_args
from flagscale.exceptions import ConfigError

ACTIONS = ("run", "dryrun", "test", "stop", "query", "auto_tune")
TASK_TYPES = ("train", "inference", "serve")
UNSUPPORTED_TASKS = ("compress", "rl")
"""Upstream FlagScale task types this project does not run."""
RUNNER_TYPES = ("ssh", "slurm")
BACKENDS: dict[str, tuple[str, ...] | None] = {"train": ("megatron",), "inference": ("vllm",), "serve": None}
"""The engines of each task (serve: checked by the serve runner against its engine table,
flagscale/serve/engines/)."""


@dataclass(slots=True, kw_only=True)
class TaskSpec:
    type: str = "train"
    """What runs: train, inference or serve."""
    backend: str | None = None
    """The engine: megatron for train, vllm for inference/serve (the default of each)."""
    entrypoint: str | None = None
    """The program each rank runs (default: the task's own, e.g. flagscale/train/train_gpt.py)."""

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            kind = "is a task this project does not run" if self.type in UNSUPPORTED_TASKS else "is unknown"
            raise ConfigError(f"experiment.task.type '{self.type}' {kind} (supported: {', '.join(TASK_TYPES)})")
        backends = BACKENDS[self.type]
        if backends is None:
            return
        self.backend = self.backend or backends[0]
        if self.backend not in backends:
            raise ConfigError(f"experiment.task.backend '{self.backend}' is not supported for {self.type} "
                              f"(supported: {', '.join(backends)})")


# Upstream's serving options this project does not implement: each ends in one line naming the key.
_UNSUPPORTED_DEPLOY = {
    "name": "Ray Serve routes", "enable_composition": "composed Ray Serve pipelines",
    "prefill_decode_disaggregation": "prefill/decode disaggregation", "prefill_num": "prefill/decode disaggregation",
    "decode_num": "prefill/decode disaggregation", "prefill_decode_strategy": "prefill/decode disaggregation",
    "request": "Ray Serve request schemas", "working_dir": "Ray Serve runtime environments",
}


@dataclass(slots=True, kw_only=True)
class DeployConfig:
    """Serve settings upstream keeps under `experiment.runner.deploy` (formerly `experiment.deploy`)."""

    port: int | None = None
    """The port every deployment listens on unless its engine_args.port says otherwise."""
    engine: str | None = None
    """The serving engine of deployments that name none (default: vllm)."""
    use_fs_serve: bool = False
    """Upstream's Ray Serve wrapper; here serving always runs the engine's own OpenAI server."""

    def __post_init__(self) -> None:
        if self.use_fs_serve:
            raise ConfigError("experiment.runner.deploy.use_fs_serve: true (Ray Serve deployments) is not supported; "
                              "serving runs the engine's own OpenAI-compatible server: set use_fs_serve: false")

    @classmethod
    def check_unsupported(cls, data: Mapping[str, Any], path: str) -> None:
        for key, value in data.items():
            if key in _UNSUPPORTED_DEPLOY and value not in (None, False, 0):
                raise ConfigError(f"{path}.{key}: {_UNSUPPORTED_DEPLOY[key]} are not supported here "
                                  f"(supported deploy keys: port, engine, use_fs_serve: false)")


@dataclass(slots=True, kw_only=True)
class SlurmConfig:
    """`experiment.runner.slurm`: the batch job that `runner.type: slurm` submits (the #SBATCH header)."""

    partition: str | None = None
    """--partition (default: the cluster's default partition)."""
    account: str | None = None
    """--account to charge."""
    qos: str | None = None
    """--qos."""
    time: str | None = None
    """--time limit, as sbatch takes it (minutes, or [D-]HH:MM:SS)."""
    nodes: int | None = None
    """--nodes (the same as experiment.runner.nnodes; default 1)."""
    ntasks_per_node: int | None = None
    """Processes per node that torchrun starts (default: gpus_per_node, else experiment.runner.nproc_per_node, else
    1). Slurm itself runs one task per node: FlagScale's per-node script, which starts torchrun."""
    gpus_per_node: int | None = None
    """--gpus-per-node."""
    exclusive: bool = False
    """--exclusive: the nodes are the job's alone."""
    constraint: str | None = None
    """--constraint (node features)."""
    reservation: str | None = None
    """--reservation."""
    extra_sbatch_args: list[str] = field(default_factory=list)
    """More sbatch options, e.g. ["--mem=0", "--gres=gpu:8"]; each is checked against sbatch's own options."""
    container_image: str | None = None
    """Run every node's part inside this image (pyxis: srun --container-image); needs the pyxis plugin."""
    container_mounts: str | None = None
    """pyxis --container-mounts (e.g. /data:/data); the experiment dir and the launching directory are always
    mounted at their own paths (the node scripts are there)."""
    device_type: str | None = None
    """The device type of the nodes (selects experiment.envs.device_type_specific and per-type runner settings)."""

    def __post_init__(self) -> None:
        for name in ("nodes", "ntasks_per_node", "gpus_per_node"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"experiment.runner.slurm.{name} must be a positive integer, got {value!r}")
        if not all(isinstance(a, str) for a in self.extra_sbatch_args):
            raise ConfigError("experiment.runner.slurm.extra_sbatch_args must be a list of strings")
        check_extra_args(self.extra_sbatch_args, "experiment.runner.slurm.extra_sbatch_args")
        if self.container_mounts and not self.container_image:
            raise ConfigError("experiment.runner.slurm.container_mounts needs container_image")


@dataclass(slots=True, kw_only=True)
class RunnerConfig:
    type: str = "ssh"
    """Where hosts come from: ssh (a hostfile, or this machine), or slurm (a batch job; see runner.slurm)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """The Slurm batch job of runner.type slurm."""
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
    max_restarts: int = 0
    """Launch again up to this many times after a failure a restart can cure (a killed or crashed rank, a
    communication error, a lost host, a hang; a server whose health check fails), training resuming from the
    latest checkpoint. Under action=run a detached supervisor process does it (stopped by action=stop); under
    action=test the foreground process. torchrun itself does not restart (its --max-restarts stays 0)."""
    restart_backoff: float = 10.0
    """Seconds between a failure and the restart."""
    hang_timeout: float | None = None
    """Training: seconds without a new iteration in the metrics while the processes live = a hang (before the
    first iteration, 4x as long: start-up): each rank's Python stack is saved (py-spy dump) to
    <log dir>/stacks/, the job is stopped and, within max_restarts, launched again. None: not watched."""
    rdzv_backend: str = "static"
    """torchrun rendezvous: static (master addr/port) or c10d."""
    device_type_specific: dict[str, Any] = field(default_factory=dict)
    """Per host type runner settings, e.g. {A100: {nproc_per_node: 8}}."""
    per_node_task: bool = False
    """Each host runs its own single-node job (torchrun --nnodes 1 --node-rank 0, master localhost)."""
    docker: str | None = None
    """Run each host's command inside this (running) container with `docker exec`."""
    deploy: DeployConfig = field(default_factory=DeployConfig)
    """Serve settings: the default port and engine of the deployments."""
    node_rank: int | None = None
    """Upstream's single-host rank; over SSH each host's rank is its position in the hostfile."""
    rdzv_id: str | None = None
    """torchrun's rendezvous id (default: the run id)."""
    ray_port: int | None = None
    """Port of the Ray head in a multi-host serve job (default: experiment.runner.master_port, or a free one)."""
    ray_dashboard_port: int | None = None
    """Ray's dashboard port (default: no dashboard)."""
    torchrun_args: dict[str, Any] = field(default_factory=dict)
    """Other torchrun options given under `runner` (max_restarts, monitor_interval, ...), passed to torchrun."""

    def __post_init__(self) -> None:
        if self.type not in RUNNER_TYPES:
            raise ConfigError(f"experiment.runner.type '{self.type}' is not supported (supported: "
                              f"{', '.join(RUNNER_TYPES)})")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ConfigError(f"experiment.runner.max_restarts must be a whole number >= 0, got {self.max_restarts!r}")
        if not isinstance(self.restart_backoff, (int, float)) or self.restart_backoff < 0:
            raise ConfigError(f"experiment.runner.restart_backoff must be seconds >= 0, got {self.restart_backoff!r}")
        hang = self.hang_timeout
        if hang is not None and (not isinstance(hang, (int, float)) or hang <= 0):
            raise ConfigError(f"experiment.runner.hang_timeout must be seconds > 0 (or null: off), got "
                              f"{self.hang_timeout!r}")
        for name in ("nnodes", "nproc_per_node", "ssh_port", "master_port", "ray_port", "ray_dashboard_port"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"experiment.runner.{name} must be a positive integer, got {value!r}")
        if self.backend not in ("torchrun", "direct"):
            raise ConfigError(f"experiment.runner.backend must be 'torchrun' or 'direct', got '{self.backend}'")
        if self.rdzv_backend not in ("static", "c10d"):
            raise ConfigError("experiment.runner.rdzv_backend must be 'static' or 'c10d'")
        if self.type == "slurm":
            self._check_slurm()

    def _check_slurm(self) -> None:
        """What does not go with a Slurm job, and the node count given twice."""
        slurm = self.slurm
        if self.hostfile is not None:
            raise ConfigError("experiment.runner.hostfile: on Slurm the scheduler picks the nodes; remove the "
                              "hostfile (or set runner.type: ssh), and set runner.slurm.nodes")
        if self.no_shared_fs:
            raise ConfigError("experiment.runner.no_shared_fs: a Slurm job needs exp_dir on a file system every "
                              "node shares (scripts and logs are written there)")
        if self.docker is not None:
            raise ConfigError("experiment.runner.docker: on Slurm use runner.slurm.container_image (pyxis)")
        if slurm.nodes and self.nnodes and slurm.nodes != self.nnodes:
            raise ConfigError(f"experiment.runner.nnodes={self.nnodes} but runner.slurm.nodes={slurm.nodes}; set one")
        self.nnodes = self.nnodes or slurm.nodes or 1


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
    variables: dict[str, Any] = field(default_factory=dict)
    """User variables (`experiment.seed`, `experiment.load`, ...) that the YAML references as ${experiment.X}."""


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
    """`unknown key 'a.b'; did you mean 'c'?` (or the known keys, when they are few enough to read)."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        hint = f"; did you mean '{close[0]}'?"
    elif len(known) <= 30:
        hint = f"; known keys: {', '.join(sorted(known))}"
    else:
        hint = f"; no known key is close ({len(known)} known)"
    return f"unknown key '{dotted}'{hint}"


def _convert(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return build(hint, value, path)
    allowed = _allowed_types(hint)
    if value is None and type(None) in allowed:
        return None
    value = _from_string(value, allowed)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not any(_isinstance(value, t) for t in allowed):
        names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed if t is not type(None))
        raise ConfigError(f"{path} must be {names}, got {value!r}")
    return value


def _from_string(value: Any, allowed: tuple[Any, ...]) -> Any:
    """Numbers and booleans given as strings (`nnodes: '1'`), as upstream's runner accepts them."""
    if not isinstance(value, str) or str in allowed or Any in allowed:
        return value
    text = value.strip()
    if int in allowed and re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if float in allowed and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
        return float(text)
    if bool in allowed and text.lower() in ("true", "false"):
        return text.lower() == "true"
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
