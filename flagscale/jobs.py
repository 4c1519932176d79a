"""Headless job control: prepare, launch, stop and status of a job, returning data and never printing.

`flagscale/runner/actions.py` (run.py's actions) and `flagscale/cli.py` render what these return; the
auto-tuner launches and stops its trials through them. Long waits report through an optional callback.
"""

from __future__ import annotations

import os
import re
import shlex
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from flagscale.config.loader import JobConfig, select_hosts, unused_variable_error
from flagscale.exceptions import ConfigError, FlagScaleError, JobRecordError, LaunchError
from flagscale.launcher.launcher import HostStatus, Launcher, StopResult
from flagscale.runner.base import PlanContext, TaskRunner, runner_for
from flagscale.runner.metrics import MetricsSummary, read_metrics
from flagscale.spec.plan import Plan, ReadyCheck
from flagscale.spec.private import private_dirs, write_private
from flagscale.spec.process import is_alive, terminate
from flagscale.spec.record import JobRecord, JobState, LauncherSettings, load_record, record_path

Progress = Callable[[str], None]
SUPERVISOR_STOP_S = 60.0
"""How long `stop` waits for a job's supervisor to stop the job it watches (beyond the job's stop_timeout)."""


def _quiet(_: str) -> None:
    """The default progress callback: report nothing."""


@dataclass(slots=True)
class JobStatus:
    """One look at a recorded job: its state, each host's status (in record order) and the metrics so far."""

    record: JobRecord
    state: JobState
    hosts: list[HostStatus]
    metrics: MetricsSummary | None
    scheduler: Any = None
    """What the scheduler says of the job (a Slurm job: flagscale.launcher.slurm.SlurmJob); None without one."""


@dataclass(slots=True)
class StopReport:
    """What `stop` did: nothing when every host had already been stopped, else one result per host."""

    record: JobRecord
    already_stopped: bool
    results: list[StopResult]
    supervisor: int | None = None
    """The pid of the job's supervisor process, stopped first (it stops the job it watches)."""

    @property
    def unreached(self) -> list[StopResult]:
        return [r for r in self.results if r.error]

    @property
    def had_ended(self) -> bool:
        """Every host answered and no process of the job was left to signal."""
        return not self.unreached and all(r.found == 0 for r in self.results)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def prepare(job: JobConfig, exclude: Sequence[str] = ()) -> tuple[TaskRunner, PlanContext]:
    """Validate everything that can be validated before a process starts. Hosts named in `exclude` (lost by an
    earlier launch) are not used: the hostfile's spare hosts beyond nnodes take their place."""
    hosts = select_hosts(job, exclude)
    runner = runner_for(job.experiment.task.type)
    ctx = PlanContext(job=job, hosts=hosts, run_id=new_run_id(), master_port=job.experiment.runner.master_port,
                      notes=list(job.notes))
    runner.validate(ctx)
    unused = unused_variable_error(job)
    if unused:
        raise ConfigError(unused)
    return runner, ctx


def launcher_settings(job: JobConfig, exclude: Sequence[str] = ()) -> LauncherSettings:
    """What a launcher needs; kept in the job record so stop/query need no config. On Slurm, `exclude` (nodes an
    earlier launch lost) is left out of the allocation."""
    runner = job.experiment.runner
    slurm = None
    if runner.type == "slurm":
        from flagscale.launcher.slurm import settings_of

        slurm = settings_of(runner, job.experiment.exp_name, job.experiment.envs, tuple(exclude),
                            shared=(str(job.exp_dir), os.getcwd()))
    return LauncherSettings(ssh_port=runner.ssh_port, strict_host_key_checking=runner.ssh_strict_host_key_checking,
                            connect_timeout=runner.ssh_connect_timeout, no_shared_fs=runner.no_shared_fs,
                            stop_timeout=runner.stop_timeout, python=job.python, executor=runner.type, slurm=slurm)


def launch(job: JobConfig, on_note: Progress = _quiet, on_wait: Progress = _quiet, exclude: Sequence[str] = (),
           relaunch: bool = False) -> JobRecord:
    """Plan, check nothing is running there already, start on every host, and record the job. The plan's notes
    go to `on_note`; waiting for a server to answer reports to `on_wait`. Any failure before the launch is
    complete (Ctrl-C included) stops what started. A supervisor's `relaunch` replaces the job it has just
    stopped (whose lost hosts, in `exclude`, cannot be asked)."""
    runner, ctx = prepare(job, exclude)
    if not relaunch:
        refuse_if_running(job)
    settings = launcher_settings(job, exclude)
    with Launcher.from_settings(settings) as launcher:
        facts = launcher.connect_all(ctx.hosts, ctx.hosts[0], ctx.master_port, ctx.job_device_env)
        ctx.master_port = facts.port
        _use_host_devices(runner, ctx, facts.devices)
        plan = runner.plan(ctx)
        for note in plan.notes:
            on_note(note)
        launcher.check_ports(plan)
        _save_config(job, plan)
        record = launcher.launch(plan, _record_base(job, plan, settings))
        try:
            remember_last_job(record.exp_dir)
            if plan.ready is not None:
                _wait_ready(launcher, record, plan.ready, on_wait)
                _resolve_urls(launcher, record)
        except BaseException:  # Ctrl-C or any error before the launch is complete: stop what started
            launcher.roll_back(record, record.settings.stop_timeout)
            raise
    return record


def stop(exp_dir: str | Path) -> StopReport:
    """Stop the job recorded in exp_dir on every host; a later call retries hosts not reached."""
    record = load_record(exp_dir)
    supervisor = record.info.get("supervisor") or {}
    stopped_supervisor = None
    if terminate(supervisor, timeout=record.settings.stop_timeout + SUPERVISOR_STOP_S):
        stopped_supervisor = supervisor["pid"]
        record = load_record(exp_dir)  # it stopped the job it watched, or one it was launching
    if all(h.stopped_at is not None for h in record.hosts):
        return StopReport(record=record, already_stopped=True, results=[], supervisor=stopped_supervisor)
    with Launcher.from_settings(record.settings) as launcher:
        results = launcher.stop(record, record.settings.stop_timeout)
        launcher.collect_logs(record)
    record.save()
    return StopReport(record=record, already_stopped=False, results=results, supervisor=stopped_supervisor)


def status(exp_dir: str | Path) -> JobStatus:
    """Each host's state and the metrics so far, asked of the hosts once."""
    record = load_record(exp_dir)
    with Launcher.from_settings(record.settings) as launcher:
        return status_of(launcher, record)


def status_of(launcher: Launcher, record: JobRecord) -> JobStatus:
    """`status` through a launcher the caller already holds (a watch loop keeps its connections)."""
    statuses = launcher.status(record)
    state = launcher.state_of(record, statuses)
    return JobStatus(record=record, state=state, hosts=statuses, metrics=metrics(launcher, record),
                     scheduler=launcher.scheduler(record))


def metrics(launcher: Launcher, record: JobRecord) -> MetricsSummary | None:
    """The job's metrics so far; None if there are none yet or the host that holds them does not answer."""
    path = record.info.get("metrics_file")
    try:
        return read_metrics(launcher.read_text(record, path)) if path else None
    except FlagScaleError:
        return None


def refuse_if_running(job: JobConfig) -> None:
    """FlagScaleError when the job recorded in job.exp_dir still runs (or cannot be told not to)."""
    if not record_path(job.exp_dir).is_file():
        return
    try:
        previous = load_record(job.exp_dir)
    except JobRecordError:
        return
    if is_alive(previous.info.get("supervisor") or {}):
        state = JobState.RUNNING
    else:
        with Launcher.from_settings(previous.settings) as launcher:
            state = launcher.job_state(previous)
    if state in (JobState.PENDING, JobState.RUNNING, JobState.UNKNOWN):
        raise FlagScaleError(
            f"job {previous.run_id} in {job.exp_dir} is {state.value}; stop it first "
            f"(python run.py {config_args(job)} action=stop) or use another experiment.exp_dir"
        )


def _use_host_devices(runner: TaskRunner, ctx: PlanContext, devices: dict) -> None:
    """Cap processes by the devices each host itself sees; if that changes them, validate the layout again."""
    before = [ctx.nproc(h) for h in ctx.hosts]
    ctx.host_devices = devices
    if [ctx.nproc(h) for h in ctx.hosts] != before:
        ctx.notes = list(ctx.job.notes)
        runner.validate(ctx)


def _wait_ready(launcher: Launcher, record: JobRecord, ready: ReadyCheck, on_wait: Progress) -> None:
    """Wait until every ready URL answers; if the job dies or the time runs out, stop it and explain."""
    deadline = time.time() + ready.timeout_s
    while True:
        resolved = [launcher.resolve(record, url) for url in ready.urls]  # None: the job has not chosen them yet
        pending = [url if real is None else real for url, real in zip(ready.urls, resolved)
                   if real is None or not answers(real)]
        if not pending:
            return
        state = launcher.job_state(record)
        if state.is_terminal() or time.time() > deadline:
            launcher.stop(record, record.settings.stop_timeout)
            record.save()
            why = f"the job is {state.value}" if state.is_terminal() else f"not ready after {ready.timeout_s:.0f}s"
            raise LaunchError(f"{why}: {pending[0]} does not answer; stopped the job. Last lines of "
                              f"{record.hosts[0].log_path}:\n{log_tail(record.hosts[0].log_path)}")
        on_wait(f"waiting for {pending[0]} ({time.time() - record.created_at:.0f}s)")
        time.sleep(1.0)


def _resolve_urls(launcher: Launcher, record: JobRecord) -> None:
    """The served URLs as the running job chose them (a Slurm node's address), kept in the record."""
    urls = record.info.get("urls") or {}
    resolved = {name: launcher.resolve(record, url) or url for name, url in urls.items()}
    if resolved != urls:
        record.info["urls"] = resolved
        record.save()


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether an HTTP endpoint answers 200 (a server's readiness or health check)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def _record_base(job: JobConfig, plan: Plan, settings: LauncherSettings) -> dict:
    return {
        "run_id": plan.run_id, "task_type": plan.task_type, "exp_name": job.experiment.exp_name,
        "exp_dir": plan.exp_dir, "log_dir": plan.log_dir, "created_at": time.time(),
        "settings": settings, "master_addr": plan.master_addr, "master_port": plan.master_port,
        "after_stop": plan.after_stop, "info": plan.info,
    }  # fmt: skip


def _save_config(job: JobConfig, plan: Plan) -> None:
    private_dirs(plan.log_dir)
    write_private(Path(plan.log_dir) / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(job.raw)))


def config_args(job: JobConfig) -> str:
    """The run.py arguments that name this job's config again (for the follow-up commands people are shown)."""
    source = job.source
    if source.config_dir is None:
        return f"experiment.exp_dir={shlex.quote(str(job.exp_dir))}"
    overrides = [o for o in source.overrides if not o.startswith("action=")]
    return shlex.join(["--config-path", str(source.config_dir), "--config-name", source.config_name or "",
                       *overrides])


# A rank's own error line in a torchrun log: `[default3]:error: ...` or the last line of a traceback.
RANK_ERROR = re.compile(r"^\[default\d+\]:((error: .*)|([A-Za-z_.]*(Error|Exception)\b.*))$")


def log_tail(path: str, lines: int = 15) -> str:
    """The log's last lines, after the ranks' first distinct error lines when they come earlier (torchrun's
    failure summary, which ends the log, names no cause)."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(log not readable here)"
    errors: list[str] = []
    for line in text[:-lines]:
        found = RANK_ERROR.match(line)
        if found and found.group(1) not in errors:
            errors.append(found.group(1))
    shown = [f"  (rank error) {e}" for e in errors[:5]] + (["  ..."] if errors else [])
    return "\n".join(shown + text[-lines:])


def state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "flagscale"


def remember_last_job(exp_dir: str) -> None:
    state_dir().mkdir(parents=True, exist_ok=True)
    (state_dir() / "last_job").write_text(exp_dir + "\n")
