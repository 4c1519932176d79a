"""The task-runner interface: a runner only plans. It turns a validated config into a Plan;
it never starts a process or opens a connection itself."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagscale.config.envs import layered_env
from flagscale.config.hostfile import Host
from flagscale.config.loader import JobConfig
from flagscale.exceptions import ConfigError
from flagscale.launcher.hostctl import VISIBLE_DEVICE_VARS, visible_devices
from flagscale.spec.plan import MASTER_ADDR, MASTER_PORT, Plan

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(slots=True, kw_only=True)
class PlanContext:
    """Everything a runner may use to plan; run-time facts (run id, port) are filled in by the action."""

    job: JobConfig
    hosts: list[Host]
    run_id: str
    master_port: int | None
    notes: list[str] = field(default_factory=list)
    """Warnings found while validating (shown by dryrun and run)."""
    host_devices: dict[Host, int | None] | None = None
    """The devices each host sees under the job's environment, as it reported them at launch (None: the hosts
    were not asked, as in a dryrun: then only the config's env layers count)."""

    @property
    def exp_dir(self) -> Path:
        return self.job.exp_dir

    @property
    def log_dir(self) -> Path:
        return self.exp_dir / "logs" / self.run_id

    @property
    def scheduled(self) -> bool:
        """The scheduler (Slurm) picks the nodes when the job starts: the plan's hosts are node0, node1, ..."""
        return self.job.experiment.runner.type == "slurm"

    @property
    def master_addr(self) -> str:
        """The rendezvous address: the config's, else the first host (on Slurm: the first node's address, known
        once the job runs: a placeholder the node's script fills in)."""
        runner = self.job.experiment.runner
        return runner.master_addr or (MASTER_ADDR if self.scheduled else self.hosts[0].name)

    def address(self, host: Host) -> str:
        """How processes reach a host: its name; on Slurm, the first node's address (filled in when the job runs;
        the other nodes' addresses are not planned)."""
        return MASTER_ADDR if self.scheduled and host == self.hosts[0] else host.name

    @property
    def rendezvous_port(self) -> int | str:
        """The rendezvous port: the config's or the one found free at launch (on Slurm: found free on the first
        node inside the job, a placeholder); 29500 in a dryrun that did not ask."""
        if self.master_port is None and self.scheduled:
            return MASTER_PORT
        return self.master_port or 29500

    def host_env(self, host: Host) -> dict[str, str]:
        return layered_env(self.job.experiment.envs, host.type, host.name)

    def nproc(self, host: Host) -> int:
        """Processes on a host: runner setting (per type if given), else the host's slots, else (as upstream) its
        visible devices, else 1; capped by slots and visible devices."""
        runner = self.job.experiment.runner
        per_type = runner.device_type_specific.get(host.type or "", {}) if host.type else {}
        visible = self.visible_devices(host)
        wanted = int(per_type.get("nproc_per_node") or runner.nproc_per_node or host.slots or visible or 1)
        caps = [wanted]
        if host.slots:
            caps.append(host.slots)
        if visible is not None:
            caps.append(visible)
        return min(caps)

    def visible_devices(self, host: Host) -> int | None:
        """What the host reported, else what the config's env layers set for it (never this machine's own)."""
        if self.host_devices is not None and host in self.host_devices:
            return self.host_devices[host]
        return devices_count(self.host_env(host))

    def job_device_env(self, host: Host) -> dict[str, str]:
        """The *_VISIBLE_DEVICES the job's env layers set for a host (sent to it when it is asked)."""
        return {k: v for k, v in self.host_env(host).items() if k in VISIBLE_DEVICE_VARS}


def devices_count(job_env: dict[str, str], host_env: dict[str, str] | None = None) -> int | None:
    """How many devices *_VISIBLE_DEVICES lists (the job's value over the host's); None: no cap."""
    found = visible_devices(job_env, host_env or {})
    return None if found is None else int(found["count"])


class TaskRunner(ABC):
    """Plans one task type. Subclasses differ only in what they plan."""

    task_type: str

    def validate(self, ctx: PlanContext) -> None:
        """Raise ConfigError for anything that would fail after launch (default: nothing)."""

    @abstractmethod
    def plan(self, ctx: PlanContext) -> Plan: ...

    def info(self, ctx: PlanContext) -> dict[str, Any]:
        """Facts kept in the job record for query/progress (e.g. train_iters, metrics file)."""
        return {}


RUNNERS = {
    "train": "flagscale.runner.train:TrainRunner",
    "serve": "flagscale.runner.serve:ServeRunner",
    "inference": "flagscale.runner.inference:InferenceRunner",
}


def runner_for(task_type: str) -> TaskRunner:
    """The runner of a task type (imported on demand: a train-only install needs no vLLM)."""
    if task_type not in RUNNERS:
        raise ConfigError(f"task type '{task_type}' is not supported (supported: {', '.join(RUNNERS)})")
    module_name, _, class_name = RUNNERS[task_type].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise ConfigError(f"task type '{task_type}' is not available in this version of FlagScale") from None
    return getattr(module, class_name)()
