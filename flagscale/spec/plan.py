"""A Plan is everything a runner decides: which process runs on which host, with which
argv, env, cwd and log. Rendering a plan gives one readable bash script per host; dryrun
writes exactly the scripts that run would start."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagscale.config.hostfile import Host

MASTER_ADDR = "@FLAGSCALE_MASTER_ADDR@"
MASTER_PORT = "@FLAGSCALE_MASTER_PORT@"
"""Values a scheduled (Slurm) job knows only once it runs: its first node's address and a port free there. A plan
writes these placeholders; a node's script reads them from the variables of the same name that the batch script
sets. Nothing else in a value is ever expanded by the shell."""
_RUNTIME_VALUE = re.compile(r"@(FLAGSCALE_MASTER_ADDR|FLAGSCALE_MASTER_PORT)@")


def shell_word(value: str) -> str:
    """One shell word for `value`: quoted, except the run-time placeholders, which become "${VARIABLE}"."""
    parts = _RUNTIME_VALUE.split(value)
    if len(parts) == 1:
        return shlex.quote(value)
    return "".join(f'"${{{part}}}"' if odd else shlex.quote(part) for odd, part in
                   ((i % 2 == 1, p) for i, p in enumerate(parts)) if odd or part)


def shell_join(argv: Iterable[str]) -> str:
    return " ".join(shell_word(a) for a in argv)


def readable(value: str) -> str:
    """`value` for people: each placeholder named by what it stands for."""
    names = {"FLAGSCALE_MASTER_ADDR": "<first node's address>", "FLAGSCALE_MASTER_PORT": "<port chosen in the job>"}
    return _RUNTIME_VALUE.sub(lambda found: names[found.group(1)], value)


def fill_runtime_values(value: str, known: Mapping[str, str]) -> str | None:
    """`value` with its placeholders replaced by the values the running job chose (None if one is not known)."""
    names = _RUNTIME_VALUE.findall(value)
    if any(name not in known for name in names):
        return None
    return _RUNTIME_VALUE.sub(lambda found: known[found.group(1)], value)


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
    container: str | None = None
    """Run the command inside this running container (`docker exec`); env, cwd and before_start apply there."""

    @property
    def exit_file(self) -> str:
        return str(Path(self.log_path).with_suffix(".exit"))

    @property
    def pid_file(self) -> str:
        """Where the host controller notes the process's pid, pgid and start time as it starts it."""
        return str(Path(self.log_path).with_suffix(".pid"))


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
        """`<exp_dir>/logs/<run id>/scripts`: one folder per launch or dryrun, so nothing ever rewrites the
        script a running job's bash is still reading."""
        return str(Path(self.log_dir) / "scripts")

    def script_path(self, spec: ProcessSpec) -> str:
        name = f"{spec.host.slug}-{spec.label}" if spec.label else spec.host.slug
        return str(Path(self.scripts_dir) / f"{name}.sh")


def render_script(plan: Plan, spec: ProcessSpec, late_env: Sequence[str] = ()) -> str:
    """The bash script one host runs; every value is shell-quoted. `late_env`: lines after the environment that
    set what only the node knows when it runs (a Slurm node's experiment.envs.node_specific, `case_env`)."""
    q = shlex.quote
    lines = [
        "#!/usr/bin/env bash",
        f"# FlagScale {plan.task_type} job {plan.run_id}: host {spec.host.name} (node rank {spec.node_rank})",
        "set -e",
        f"exit_file={q(spec.exit_file)}",
        f"mkdir -p {q(str(Path(spec.log_path).parent))}",
    ]
    body = _job_lines(spec, late_env)
    if spec.container is None:
        lines += body
        lines += ["set +e", shell_join(spec.argv), "status=$?"]
    else:
        lines += _container_lines(plan, spec, body)
    lines += ["umask 077  # the job has ended: the exit file is the owner's only",
              'echo "$status" > "$exit_file"', 'exit "$status"']
    return "\n".join(lines) + "\n"


def case_env(variable: str, by_value: Mapping[str, Mapping[str, str]], why: str) -> list[str]:
    """Shell lines exporting the environment that belongs to the value of $variable (a `case` statement)."""
    if not by_value:
        return []
    lines = [f'case "${{{variable}:-}}" in  # {why}']
    for value, env in by_value.items():
        exports = "; ".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
        lines.append(f"  {shlex.quote(value)}) {exports or ':'} ;;")
    return [*lines, "esac"]


def _job_lines(spec: ProcessSpec, late_env: Sequence[str] = ()) -> list[str]:
    """cd, environment and before_start: on the host, or inside the container."""
    q = shlex.quote
    lines = [f"cd {q(spec.cwd)}"]
    lines += [f"export {name}={shell_word(value)}" for name, value in spec.env.items()]
    lines += late_env
    if spec.before_start:
        lines.append("# experiment.cmds.before_start (a failure ends the script with its status)")
        lines.append("trap 'status=$?; umask 077; echo \"$status\" > \"$exit_file\"' ERR" if spec.container is None
                     else "set -e")
        lines += spec.before_start
        lines.append("trap - ERR" if spec.container is None else "set +e")
    return lines


def _container_lines(plan: Plan, spec: ProcessSpec, body: list[str]) -> list[str]:
    """experiment.runner.docker: the job runs in the container through `docker exec`; stopping this
    script (SIGTERM from `stop`) signals the command inside the container by the pid it recorded there."""
    q = shlex.quote
    pid_file = f"/tmp/flagscale-{plan.run_id}-{spec.host.slug}{'-' + spec.label if spec.label else ''}.pid"
    inner = "\n".join([f"echo $$ > {q(pid_file)}", *body, f"exec {shell_join(spec.argv)}"])
    stop_inner = f"kill -TERM $(cat {q(pid_file)}) 2>/dev/null"
    on_stop = f'docker exec "$container" bash -c {q(stop_inner)}; wait "$child"'
    return [
        f"container={q(spec.container or '')}",
        "# experiment.runner.docker: everything below runs inside the container",
        f"inner={q(inner)}",
        f"trap {q(on_stop)} TERM INT",
        "set +e",
        'docker exec -i "$container" bash -c "$inner" &',
        "child=$!",
        'wait "$child"',
        "status=$?",
    ]
