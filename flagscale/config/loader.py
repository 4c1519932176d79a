"""From a composed Hydra config to a validated JobConfig, plus the hosts a job runs on."""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flagscale.config.hostfile import LOCALHOST, Host, parse_hostfile
from flagscale.config.schema import (
    ACTIONS,
    RUNNER_TYPES,
    TASK_TYPES,
    UNSUPPORTED_TASKS,
    DeployConfig,
    ExperimentConfig,
    RunnerConfig,
    TaskSpec,
    build,
    unknown_key_message,
)
from flagscale.config.source_map import SourceMap, build_source_map
from flagscale.config.vocabulary import coerce, normalize_key, torchrun_options
from flagscale.exceptions import ConfigError

TOP_LEVEL = ("action", "experiment", "train", "inference", "serve")
# torchrun options the runner sets itself, and why a YAML may not.
TORCHRUN_OWNED = {
    "log_dir": "FlagScale keeps torchrun's logs under <exp_dir>/logs/<run id>/torchrun; remove it",
    "standalone": "FlagScale sets the rendezvous itself (master_addr/master_port or rdzv_backend); remove it",
    "module": "the entrypoint is experiment.task.entrypoint; remove it",
    "run_path": "the entrypoint is experiment.task.entrypoint; remove it",
    "no_python": "the entrypoint is experiment.task.entrypoint; remove it",
    "training_script": "the entrypoint is experiment.task.entrypoint; remove it",
    "training_script_args": "arguments come from the task YAML; remove it",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigSource:
    """Where a config came from, so errors can name the YAML file and line that set a key."""

    config_dir: Path | None = None
    config_name: str | None = None
    overrides: tuple[str, ...] = ()
    choices: tuple[tuple[str, str | None], ...] = ()
    """The config group options Hydra chose (`train` -> `7b`), in Hydra's runtime order."""

    def locate(self, key: str) -> str:
        """`file:line` of the YAML line that set `key` (the last writer wins), or the override that did."""
        if self.config_dir is None or self.config_name is None:
            for override in self.overrides:
                if re.match(rf"^[+~]*{re.escape(key)}=", override):
                    return f"command-line override '{override}'"
            return "the composed config"
        found = _source_map(self.config_dir, self.config_name, self.choices, self.overrides).locate(key)
        return found or "the composed config"


@cache
def _source_map(config_dir: Path, name: str, choices: tuple, overrides: tuple[str, ...]) -> SourceMap:
    return build_source_map(config_dir, name, dict(choices), overrides)


@dataclass(slots=True, kw_only=True)
class JobConfig:
    action: str
    experiment: ExperimentConfig
    task: dict[str, Any]
    source: ConfigSource
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Warnings found while loading (shown by dryrun and run)."""
    referenced: frozenset[str] = frozenset()
    """The X of every ${experiment.X} in the YAML (user variables must be among them)."""

    @property
    def exp_dir(self) -> Path:
        return Path(self.experiment.exp_dir).expanduser().resolve()

    @property
    def python(self) -> str:
        return self.experiment.runner.python or sys.executable


def load_job_config(cfg: DictConfig, source: ConfigSource) -> JobConfig:
    """Validate the experiment level; the task level is checked by its runner."""
    data = _resolve(cfg, source)
    for key in data:
        if key in UNSUPPORTED_TASKS:
            raise ConfigError(f"section '{key}' is for a task this project does not run (supported: "
                              f"{', '.join(TASK_TYPES)}) (in {source.locate(key)})")
        if key not in TOP_LEVEL:
            raise ConfigError(f"{unknown_key_message(key, key, list(TOP_LEVEL))} (in {source.locate(key)})")
    action = str(data.get("action", "run"))
    if action not in ACTIONS:
        raise ConfigError(f"action={action} is not one of: {', '.join(ACTIONS)}")
    if not isinstance(data.get("experiment"), dict):
        raise ConfigError("the config has no 'experiment' section; compose an experiment YAML (see examples/)")
    notes: list[str] = []
    try:
        build(TaskSpec, data["experiment"].get("task"), "experiment.task")  # an unsupported task: say so first
        referenced = _referenced(cfg)
        shaped = upstream_shape(data["experiment"], notes)
        experiment = build(ExperimentConfig, shaped, "experiment")
    except ConfigError as err:
        raise ConfigError(_with_location(str(err), source)) from None
    task_type = experiment.task.type
    task = data.get(task_type)
    if action not in ("stop", "query") and not isinstance(task, (dict, list)):
        raise ConfigError(f"experiment.task.type is {task_type} but the config has no '{task_type}' section; "
                          f"add one via defaults (e.g. '- {task_type}: <size>')")
    return JobConfig(action=action, experiment=experiment, task=task or {}, source=source, raw=data, notes=notes,
                     referenced=frozenset(referenced))


def _resolve(cfg: DictConfig, source: ConfigSource) -> dict[str, Any]:
    """The config with interpolations resolved; a placeholder or a broken one is a one-line error."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = str(getattr(err, "full_key", None) or "")
        reason = str(err).splitlines()[0]
        if not key:
            raise ConfigError(f"cannot resolve the config: {reason}") from None
        raw = _raw_value(cfg, key)
        shown = f"{key}: '{raw}'" if raw is not None else key
        placeholder = "Unsupported interpolation type" in reason or "??" in (raw or "")
        kind = "is a placeholder to fill in" if placeholder else "cannot be resolved"
        raise ConfigError(f"{shown} {kind} ({reason}); set it, e.g. {key}=VALUE on the command line "
                          f"(in {source.locate(key)})") from None


def _raw_value(cfg: DictConfig, key: str) -> str | None:
    node: Any = cfg
    for part in key.split(".") if key else []:
        try:
            node = node._get_node(int(part) if isinstance(node, ListConfig) else part)
        except (KeyError, ValueError, IndexError, OmegaConfBaseException):
            return None
        if node is None:
            return None
    return None if node is cfg else str(node._value())


def _referenced(cfg: DictConfig) -> set[str]:
    """Names X that the config uses as ${experiment.X} (user variables upstream keeps in `experiment`)."""
    found: set[str] = set()
    stack: list[Any] = [OmegaConf.to_container(cfg, resolve=False)]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            found.update(re.findall(r"\$\{experiment\.(\w+)", item))
    return found


def upstream_shape(experiment: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Upstream FlagScale's experiment mapping in our schema's shape: user variables set aside,
    `experiment.deploy` moved under the runner, torchrun options gathered for pass-through."""
    shaped = dict(experiment)
    runner = dict(shaped.get("runner") or {})
    if "deploy" in shaped:
        runner.setdefault("deploy", shaped.pop("deploy"))
        notes.append("experiment.deploy is upstream's old place for experiment.runner.deploy; read from there")
    if runner or "runner" in shaped:
        shaped["runner"] = _runner_shape(runner)
    known = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"variables"}
    shaped["variables"] = {key: shaped.pop(key) for key in [k for k in shaped if k not in known]}
    return shaped


def unused_variable_error(job: JobConfig) -> str | None:
    """An experiment key that is neither a setting nor used as ${experiment.X}: a typo until shown otherwise.
    (Checked after the task's own checks, so a task this project does not run is named first.)"""
    known = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name != "variables"]
    for key in job.experiment.variables:
        if key not in job.referenced:
            where = job.source.locate(f"experiment.{key}")
            return (unknown_key_message(f"experiment.{key}", key, sorted(known)) + "; a user variable in "
                    f"experiment is kept only if the YAML uses ${{experiment.{key}}} (in {where})")
    return None


def _runner_shape(runner: dict[str, Any]) -> dict[str, Any]:
    kind = runner.get("type", "ssh")
    if kind not in RUNNER_TYPES:
        raise ConfigError(f"experiment.runner.type '{kind}' is not supported (supported: {', '.join(RUNNER_TYPES)})")
    if isinstance(runner.get("deploy"), dict):
        DeployConfig.check_unsupported(runner["deploy"], "experiment.runner.deploy")
    fields = {f.name for f in dataclasses.fields(RunnerConfig)}
    options = torchrun_options()
    passed = dict(runner.get("torchrun_args") or {})
    for key in [k for k in runner if k not in fields]:
        name = normalize_key(key)
        if name not in options:
            raise ConfigError(unknown_key_message(f"experiment.runner.{key}", key, sorted(fields | set(options)))
                              + " (runner keys: FlagScale's settings and torchrun's options)")
        if name in TORCHRUN_OWNED:
            raise ConfigError(f"experiment.runner.{key}: {TORCHRUN_OWNED[name]}")
        value = runner.pop(key)
        checked = coerce(options[name], value, f"experiment.runner.{key}")
        passed[name] = checked if isinstance(value, str) else value
    if passed:
        runner["torchrun_args"] = passed
    return runner


def _with_location(message: str, source: ConfigSource) -> str:
    match = re.search(r"'(experiment\.[\w.]+)'|^(experiment\.[\w.]+)", message)
    if not match:
        return message
    return f"{message} (in {source.locate(match.group(1) or match.group(2))})"


def _resolve_hostfile(path: str, source: ConfigSource) -> Path:
    """A relative hostfile path is taken from the current directory, else beside the config."""
    given = Path(path).expanduser()
    if given.is_absolute() or given.exists() or source.config_dir is None:
        return given
    beside = source.config_dir / given
    return beside if beside.exists() else given


def slurm_nodes(runner: RunnerConfig) -> list[Host]:
    """A Slurm job's nodes as a plan knows them before the scheduler names them: node0, node1, ... (node0 is the
    first node of the allocation, node i the one whose SLURM_NODEID is i)."""
    slots = runner.slurm.ntasks_per_node or runner.slurm.gpus_per_node or 0
    return [Host(name=f"node{i}", slots=slots, type=runner.slurm.device_type) for i in range(runner.nnodes or 1)]


def select_hosts(job: JobConfig, exclude: Sequence[str] = ()) -> list[Host]:
    """The hosts the job runs on: the first `nnodes` of the hostfile (skipping hosts named in `exclude`: the
    ones after nnodes are spares), or this machine."""
    runner = job.experiment.runner
    if runner.type == "slurm":
        return slurm_nodes(runner)
    if runner.hostfile is None:
        if runner.nnodes not in (None, 1):
            raise ConfigError(f"experiment.runner.nnodes={runner.nnodes} needs a hostfile (experiment.runner.hostfile)")
        return [LOCALHOST]
    hosts = parse_hostfile(_resolve_hostfile(runner.hostfile, job.source))
    nnodes = runner.nnodes or len(hosts)
    if nnodes > len(hosts):
        raise ConfigError(
            f"experiment.runner.nnodes={nnodes} but hostfile {runner.hostfile} lists {len(hosts)} host(s)"
        )
    usable = [h for h in hosts if h.name not in exclude]
    if nnodes > len(usable):
        raise ConfigError(f"{nnodes} host(s) needed but hostfile {runner.hostfile} has {len(usable)} left without "
                          f"the lost host(s) {', '.join(exclude)}; add a spare host to it (hosts after nnodes)")
    return usable[:nnodes]
