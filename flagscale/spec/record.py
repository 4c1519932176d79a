"""The job record, `<exp_dir>/job.json`: hosts, process-group ids, ports, state, timestamps.
stop/query/logs need nothing else, from any later process, even after the launcher died."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from flagscale.config.hostfile import Host
from flagscale.exceptions import JobRecordError
from flagscale.spec.private import write_private

RECORD_VERSION = 2
"""2: each host's process start time and pid file. Version 1 records load (without them: the host controller
then checks a live leader by its command line, and signals nothing once the leader is gone)."""
READABLE_VERSIONS = (1, 2)


class JobState(str, Enum):
    PENDING = "PENDING"
    """Waiting for the scheduler (a Slurm job in the queue)."""
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    UNKNOWN = "UNKNOWN"

    def is_terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.STOPPED)


SETTINGS_VERSION = 2
"""2: the executor (ssh or slurm) and a Slurm job's batch settings; version 1 settings load (as ssh)."""
READABLE_SETTINGS = (1, 2)


@dataclass(frozen=True, slots=True, kw_only=True)
class SlurmSettings:
    """How a Slurm job is submitted (from experiment.runner.slurm): the batch header and the step's options."""

    sbatch_args: list[str]
    """The #SBATCH options, in order (--job-name, --nodes, --partition, ..., extra_sbatch_args, --exclude)."""
    srun_args: list[str] = field(default_factory=list)
    """Options of the srun step beyond FlagScale's own (pyxis --container-image/--container-mounts)."""
    node_env: dict[str, dict[str, str]] = field(default_factory=dict)
    """experiment.envs.node_specific by Slurm node name: applied on the node that has the name."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LauncherSettings:
    """How to reach the job's hosts again (from experiment.runner); kept in job.json so stop/query need no config."""

    python: str
    """The interpreter that runs the host controller on every host."""
    ssh_port: int | None = None
    strict_host_key_checking: bool = True
    connect_timeout: float = 10.0
    no_shared_fs: bool = False
    stop_timeout: float = 15.0
    """Seconds between SIGTERM and SIGKILL when stopping."""
    executor: str = "ssh"
    """Where the processes run: ssh (each host, over SSH or locally) or slurm (a batch job)."""
    slurm: SlurmSettings | None = None
    version: int = SETTINGS_VERSION

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LauncherSettings:
        """From job.json; records written before the settings had a version are version 1."""
        if data.get("version", 1) not in READABLE_SETTINGS:
            raise TypeError(f"launcher settings version {data.get('version')} (this one reads {READABLE_SETTINGS})")
        slurm = data.get("slurm")
        return cls(**{**data, "version": SETTINGS_VERSION,
                      "slurm": SlurmSettings(**slurm) if isinstance(slurm, dict) else None})


@dataclass(slots=True, kw_only=True)
class HostRecord:
    host: Host
    node_rank: int
    pgid: int | None
    """The process group (= session) of the host's script; None while only `pid_file` can tell it."""
    script: str
    log_path: str
    exit_file: str
    started_at: float
    stopped_at: float | None = None
    start_time: int | None = None
    """The script's start time on its host (field 22 of /proc/<pid>/stat), reported by the host controller."""
    pid_file: str | None = None
    """Where the host controller wrote pid, pgid and start time when it started the script."""


@dataclass(slots=True, kw_only=True)
class JobRecord:
    run_id: str
    task_type: str
    exp_name: str
    exp_dir: str
    log_dir: str
    created_at: float
    hosts: list[HostRecord]
    settings: LauncherSettings
    master_addr: str
    master_port: int | None
    after_stop: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    stop_requested_at: float | None = None
    version: int = RECORD_VERSION
    """The format of this record; a loaded version-1 record stays 1 when saved again (its hosts have no start times)."""

    @property
    def path(self) -> Path:
        return record_path(self.exp_dir)

    def save(self) -> None:
        """Write atomically (a reader never sees half a record), readable by the owner only."""
        write_private(self.path, json.dumps(asdict(self), indent=2, default=str) + "\n")

    def mark_stop_requested(self) -> None:
        if self.stop_requested_at is None:
            self.stop_requested_at = time.time()


def record_path(exp_dir: str | Path) -> Path:
    return Path(exp_dir).resolve() / "job.json"


def load_record(exp_dir: str | Path) -> JobRecord:
    path = record_path(exp_dir)
    if not path.is_file():
        raise JobRecordError(f"no job record at {path}; launch a job there first (action=run)")
    try:
        data = json.loads(path.read_text())
        if data.get("version") not in READABLE_VERSIONS:
            raise JobRecordError(f"{path} has record version {data.get('version')}, written by a newer FlagScale "
                                 f"(this one reads {READABLE_VERSIONS}); use that version to stop or query it")
        data["hosts"] = [
            HostRecord(**{**h, "host": Host(**h["host"])}) for h in data["hosts"]
        ]
        data["settings"] = LauncherSettings.from_json(data["settings"])
        return JobRecord(**data)
    except (ValueError, KeyError, TypeError) as err:
        raise JobRecordError(f"{path} is not a readable job record ({err}); remove it to start afresh") from None
