"""From a composed Hydra config to a validated JobConfig, plus the hosts a job runs on."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flagscale.config.hostfile import LOCALHOST, Host, parse_hostfile
from flagscale.config.schema import ACTIONS, ExperimentConfig, build, unknown_key_message
from flagscale.exceptions import ConfigError

TOP_LEVEL = ("action", "experiment", "train", "inference", "serve")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigSource:
    """Where a config came from, so errors can name the YAML file and line."""

    config_dir: Path | None = None
    config_name: str | None = None
    overrides: tuple[str, ...] = ()

    def locate(self, key: str) -> str:
        """`file:line` of the YAML lines that set `key`, or the override that did."""
        leaf = key.rsplit(".", 1)[-1]
        for override in self.overrides:
            if re.match(rf"^[+~]*{re.escape(key)}=", override):
                return f"command-line override '{override}'"
        if self.config_dir is None:
            return "the composed config"
        pattern = re.compile(rf"^\s*{re.escape(leaf)}\s*:")
        hits = [
            f"{path}:{number}"
            for path in sorted(self.config_dir.rglob("*.yaml"))
            for number, line in enumerate(path.read_text().splitlines(), start=1)
            if pattern.match(line)
        ]
        return ", ".join(hits[:3]) if hits else "the composed config"


@dataclass(slots=True, kw_only=True)
class JobConfig:
    action: str
    experiment: ExperimentConfig
    task: dict[str, Any]
    source: ConfigSource
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def exp_dir(self) -> Path:
        return Path(self.experiment.exp_dir).expanduser().resolve()

    @property
    def python(self) -> str:
        return self.experiment.runner.python or sys.executable


def load_job_config(cfg: DictConfig, source: ConfigSource) -> JobConfig:
    """Validate the experiment level; the task level is checked by its runner."""
    try:
        data: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve the config: {err}".splitlines()[0]) from None
    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{unknown_key_message(key, key, list(TOP_LEVEL))} (in {source.locate(key)})")
    action = str(data.get("action", "run"))
    if action not in ACTIONS:
        raise ConfigError(f"action={action} is not one of: {', '.join(ACTIONS)}")
    if not isinstance(data.get("experiment"), dict):
        raise ConfigError("the config has no 'experiment' section; compose an experiment YAML (see examples/)")
    try:
        experiment = build(ExperimentConfig, data["experiment"], "experiment")
    except ConfigError as err:
        raise ConfigError(_with_location(str(err), source)) from None
    task_type = experiment.task.type
    task = data.get(task_type)
    if action not in ("stop", "query") and not isinstance(task, (dict, list)):
        raise ConfigError(f"experiment.task.type is {task_type} but the config has no '{task_type}' section; "
                          f"add one via defaults (e.g. '- {task_type}: <size>')")
    return JobConfig(action=action, experiment=experiment, task=task or {}, source=source, raw=data)


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


def select_hosts(job: JobConfig) -> list[Host]:
    """The hosts the job runs on: the first `nnodes` of the hostfile, or this machine."""
    runner = job.experiment.runner
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
    return hosts[:nnodes]
