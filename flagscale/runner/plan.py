"""A Plan is everything a runner decides: which process runs on which host, with which
argv, env, cwd and log. Rendering a plan gives one readable bash script per host; dryrun
writes exactly the scripts that run would start."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagscale.config.hostfile import Host


@dataclass(slots=True, kw_only=True)
class ProcessSpec:
    """One host's part of a job: a command started in its own session."""

    host: Host
    node_rank: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str
    log_path: str
    before_start: list[str] = field(default_factory=list)
    label: str | None = None
    """Names this process when a host runs more than one (its script is `<host>-<label>.sh`)."""

    @property
    def exit_file(self) -> str:
        return str(Path(self.log_path).with_suffix(".exit"))


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadyCheck:
    """A job that serves is 'started' only once these URLs answer 200 (polled from this machine)."""

    urls: tuple[str, ...]
    timeout_s: float = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PortCheck:
    """A port the plan listens on: checked free on its host before anything starts."""

    host: Host
    port: int
    fix: str
    """What to change if it is taken (e.g. "set serve[0].engine_args.port to a free port")."""


@dataclass(slots=True, kw_only=True)
class Plan:
    """What an action runs: processes plus the facts stop/query/progress need later."""

    task_type: str
    exp_dir: str
    run_id: str
    log_dir: str
    processes: list[ProcessSpec]
    after_stop: list[str] = field(default_factory=list)
    master_addr: str = "localhost"
    master_port: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ready: ReadyCheck | None = None
    ports_to_check: list[PortCheck] = field(default_factory=list)

    @property
    def scripts_dir(self) -> str:
        return str(Path(self.exp_dir) / "logs" / "scripts")

    def script_path(self, spec: ProcessSpec) -> str:
        name = f"{spec.host.slug}-{spec.label}" if spec.label else spec.host.slug
        return str(Path(self.scripts_dir) / f"{name}.sh")


def render_script(plan: Plan, spec: ProcessSpec) -> str:
    """The bash script one host runs; every value is shell-quoted."""
    q = shlex.quote
    lines = [
        "#!/usr/bin/env bash",
        f"# FlagScale {plan.task_type} job {plan.run_id}: host {spec.host.name} (node rank {spec.node_rank})",
        "set -e",
        f"exit_file={q(spec.exit_file)}",
        f"mkdir -p {q(str(Path(spec.log_path).parent))}",
        f"cd {q(spec.cwd)}",
    ]
    lines += [f"export {name}={q(value)}" for name, value in spec.env.items()]
    if spec.before_start:
        lines.append("# experiment.cmds.before_start (a failure ends the script with its status)")
        lines.append("trap 'echo \"$?\" > \"$exit_file\"' ERR")
        lines += spec.before_start
        lines.append("trap - ERR")
    lines += [
        "set +e",
        shlex.join(spec.argv),
        "status=$?",
        'echo "$status" > "$exit_file"',
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"
