"""The actions (dryrun, run, test, stop, query): one path for every task type.
dryrun is literally the first half of run: the same plan, rendered and written, not started."""

from __future__ import annotations

import os
import re
import shlex
import time
import urllib.request
import uuid
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from flagscale.config.loader import JobConfig, select_hosts, unused_variable_error
from flagscale.exceptions import ConfigError, FlagScaleError, JobRecordError, LaunchError
from flagscale.launcher.launcher import Launcher, job_state
from flagscale.runner.base import PlanContext, TaskRunner, runner_for
from flagscale.runner.metrics import HostsUnreachable, MetricsSummary, describe, follow_progress, read_metrics
from flagscale.spec.plan import Plan, ReadyCheck, render_script
from flagscale.spec.private import SCRIPT_MODE, private_dirs, write_private
from flagscale.spec.record import JobRecord, JobState, LauncherSettings, load_record, record_path

console = Console(highlight=False, soft_wrap=True)
FOLLOW_INTERVAL_S = 2.0
UNREACHABLE_GIVE_UP_S = 120.0
"""`test` and `status --watch` end once a host has not answered for this long (instead of polling for ever)."""


def dispatch(job: JobConfig) -> int:
    """Carry out `job.action`; returns the process exit code."""
    handlers = {"dryrun": dryrun, "run": run, "test": test, "stop": stop, "query": query,
                "auto_tune": auto_tune}
    return handlers[job.action](job)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def prepare(job: JobConfig) -> tuple[TaskRunner, PlanContext]:
    """Validate everything that can be validated before a process starts."""
    hosts = select_hosts(job)
    runner = runner_for(job.experiment.task.type)
    ctx = PlanContext(job=job, hosts=hosts, run_id=new_run_id(), master_port=job.experiment.runner.master_port,
                      notes=list(job.notes))
    runner.validate(ctx)
    unused = unused_variable_error(job)
    if unused:
        raise ConfigError(unused)
    return runner, ctx


def launcher_settings(job: JobConfig) -> LauncherSettings:
    """What a launcher needs; kept in the job record so stop/query need no config."""
    runner = job.experiment.runner
    return LauncherSettings(ssh_port=runner.ssh_port, strict_host_key_checking=runner.ssh_strict_host_key_checking,
                            connect_timeout=runner.ssh_connect_timeout, no_shared_fs=runner.no_shared_fs,
                            stop_timeout=runner.stop_timeout, python=job.python)


def dryrun(job: JobConfig) -> int:
    runner, ctx = prepare(job)
    plan = runner.plan(ctx)
    launcher = Launcher.from_settings(launcher_settings(job))
    private_dirs(plan.log_dir, plan.scripts_dir)
    for spec in plan.processes:
        path = Path(plan.script_path(spec))
        write_private(path, render_script(plan, spec), SCRIPT_MODE)
        target = "local" if spec.host.is_local else launcher.transport(spec.host).target
        console.print(f"[bold]host {spec.host.name}[/] (node rank {spec.node_rank}, ssh target: {target})")
        console.print(f"  script: {path}")
        if spec.container:
            console.print(f"  runs inside container {spec.container} (docker exec on {spec.host.name})")
        console.print(f"  command: {shlex.join(spec.argv)}", soft_wrap=True)
    for note in plan.notes:
        console.print(f"note: {note}")
    if plan.master_port is None:
        console.print("note: the rendezvous port is chosen at launch, free on the master host "
                      "(set experiment.runner.master_port to fix it)")
    if plan.task_type == "train":
        console.print("note: dryrun does not ask the hosts: processes per host are capped by slots and by the "
                      "*_VISIBLE_DEVICES that experiment.envs sets; at launch each host's own visible devices count")
    console.print("dryrun: nothing was started.")
    return 0


def run(job: JobConfig) -> int:
    record = launch(job)
    first = record.hosts[0]
    console.print(f"[bold green]started[/] {job.experiment.task.type} job {record.run_id} on "
                  f"{len(record.hosts)} host(s)")
    console.print(f"  experiment dir: {record.exp_dir}")
    console.print(f"  log: {first.log_path}")
    for name, url in record.info.get("urls", {}).items():
        console.print(f"  serving {name}: {url}")
    if record.info.get("output_path"):
        console.print(f"  results: {record.info['output_path']}")
    config_arg = _config_args(job)
    console.print(f"  follow: tail -f {shlex.quote(first.log_path)}   (or: flagscale logs -f {record.exp_dir})")
    console.print(f"  query:  python run.py {config_arg} action=query")
    console.print(f"  stop:   python run.py {config_arg} action=stop")
    return 0


def launch(job: JobConfig) -> JobRecord:
    """Plan, check nothing is running there already, start on every host, and record the job."""
    runner, ctx = prepare(job)
    _refuse_if_running(job)
    with Launcher.from_settings(launcher_settings(job)) as launcher:
        facts = launcher.connect_all(ctx.hosts, ctx.hosts[0], ctx.master_port, ctx.job_device_env)
        ctx.master_port = facts.port
        _use_host_devices(runner, ctx, facts.devices)
        plan = runner.plan(ctx)
        for note in plan.notes:
            console.print(f"note: {note}")
        _check_ports(launcher, plan)
        _save_config(job, plan)
        record = launcher.launch(plan, _record_base(job, plan))
        try:
            remember_last_job(record.exp_dir)
            if plan.ready is not None:
                _wait_ready(launcher, record, plan.ready)
        except BaseException:  # Ctrl-C or any error before the launch is complete: stop what started
            launcher.roll_back(record, record.settings.stop_timeout)
            raise
    return record


def _use_host_devices(runner: TaskRunner, ctx: PlanContext, devices: dict) -> None:
    """Cap processes by the devices each host itself sees; if that changes them, validate the layout again."""
    before = [ctx.nproc(h) for h in ctx.hosts]
    ctx.host_devices = devices
    if [ctx.nproc(h) for h in ctx.hosts] != before:
        ctx.notes = list(ctx.job.notes)
        runner.validate(ctx)


def _check_ports(launcher: Launcher, plan: Plan) -> None:
    """Every port the plan listens on must be free on its host (hostctl `port`), before anything starts."""
    for check in plan.ports_to_check:
        answer = launcher.hostctl(check.host, "port", str(check.port))
        if "error" in answer:
            raise LaunchError(f"host {check.host.name}: {answer['error']}; nothing was started. {check.fix}")


def _wait_ready(launcher: Launcher, record: JobRecord, ready: ReadyCheck) -> None:
    """Wait until every ready URL answers; if the job dies or the time runs out, stop it and explain."""
    deadline = time.time() + ready.timeout_s
    with console.status(f"waiting for {', '.join(ready.urls)}") as spinner:
        while True:
            pending = [url for url in ready.urls if not _answers(url)]
            if not pending:
                return
            state = launcher.job_state(record)
            if state.is_terminal() or time.time() > deadline:
                launcher.stop(record, record.settings.stop_timeout)
                record.save()
                why = f"the job is {state.value}" if state.is_terminal() else f"not ready after {ready.timeout_s:.0f}s"
                raise LaunchError(f"{why}: {pending[0]} does not answer; stopped the job. Last lines of "
                                  f"{record.hosts[0].log_path}:\n{_tail(record.hosts[0].log_path)}")
            spinner.update(f"waiting for {pending[0]} ({time.time() - record.created_at:.0f}s)")
            time.sleep(1.0)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def test(job: JobConfig) -> int:
    """Run in the foreground: progress until the job ends; Ctrl-C stops it. Exit code = the job's."""
    record = launch(job)
    console.print(f"started {record.run_id}; log: {record.hosts[0].log_path}")
    with Launcher.from_settings(record.settings) as launcher:
        try:
            state = _follow(launcher, record)
        except KeyboardInterrupt:
            console.print("interrupted: stopping the job")
            launcher.stop(record, record.settings.stop_timeout)
            record.save()
            return 130
        except HostsUnreachable as lost:
            launcher.stop(record, record.settings.stop_timeout)
            record.save()
            _explain_unreachable(f"python run.py {_config_args(job)} action=stop", lost, stopped_others=True)
            return 1
        statuses = launcher.status(record)
        summary = _metrics(launcher, record)
        launcher.collect_logs(record)
    return _finish(record, state, statuses, summary)


def _follow(launcher: Launcher, record: JobRecord) -> JobState:
    """Live progress until the job ends; returns its final state (HostsUnreachable if a host stays silent)."""

    def poll() -> tuple[JobState, list[str]]:
        statuses = launcher.status(record)
        problems = [_named(s.host.name, s.error) for s in statuses if s.error]
        return job_state(statuses, record.stop_requested_at is not None), problems

    return follow_progress(console, lambda: _metrics(launcher, record), poll, interval=FOLLOW_INTERVAL_S,
                           give_up_s=UNREACHABLE_GIVE_UP_S)


def _named(host: str, error: str) -> str:
    return error if error.startswith(f"host {host}") else f"host {host}: {error}"


def _explain_unreachable(retry: str, lost: HostsUnreachable, stopped_others: bool) -> None:
    """One line per silent host: which, why, and what to run (`retry`) once it answers again."""
    done = "; stopped the job on the hosts that answer" if stopped_others else ""
    for problem in lost.problems:
        console.print(f"{problem} (unreachable for {lost.seconds:.0f}s{done}); once it answers, end its part of "
                      f"the job: {retry}", markup=False)


def _metrics(launcher: Launcher, record: JobRecord) -> MetricsSummary | None:
    """The job's metrics so far; None if there are none yet or the host that holds them does not answer."""
    path = record.info.get("metrics_file")
    try:
        return read_metrics(launcher.read_text(record, path)) if path else None
    except FlagScaleError:
        return None


def _finish(record: JobRecord, state: JobState, statuses: list, summary: MetricsSummary | None) -> int:
    console.print(f"job {record.run_id}: {state.value}; {describe(summary)}")
    if state is JobState.COMPLETED:
        return 0
    for status, host_record in zip(statuses, record.hosts):
        if status.state is JobState.FAILED:
            console.print(f"host {status.host.name} failed (exit {status.exit_code}); last lines of "
                          f"{host_record.log_path}:")
            console.print(_tail(host_record.log_path), markup=False)
    codes = [s.exit_code for s in statuses if s.exit_code]
    return codes[0] if codes else 1


def stop(job: JobConfig) -> int:
    return stop_job(job.exp_dir)


def stop_job(exp_dir: str | Path) -> int:
    """Stop the job recorded in exp_dir on every host; a later call retries hosts not reached."""
    record = load_record(exp_dir)
    if all(h.stopped_at is not None for h in record.hosts):
        console.print(f"job {record.run_id}: already stopped; nothing to do")
        return 0
    with Launcher.from_settings(record.settings) as launcher:
        results = launcher.stop(record, record.settings.stop_timeout)
        launcher.collect_logs(record)
    record.save()
    failed = 0
    for result in results:
        if result.error:
            failed += 1
            console.print(f"host {result.host.name}: [red]{result.error}[/] (run stop again to retry)")
        else:
            console.print(f"host {result.host.name}: ended {result.found} process(es)"
                          + (f", {result.killed} needed SIGKILL" if result.killed else ""))
    ended = not failed and all(r.found == 0 for r in results)
    outcome = "had already ended; nothing was signalled" if ended else "stopped"
    console.print(f"job {record.run_id}: " + (outcome if not failed else f"{failed} host(s) not reached"))
    return 1 if failed else 0


def query(job: JobConfig) -> int:
    return query_job(job.exp_dir)


def query_job(exp_dir: str | Path) -> int:
    """Print each host's state once, with progress from the metrics file."""
    record = load_record(exp_dir)
    with Launcher.from_settings(record.settings) as launcher:
        statuses = launcher.status(record)
        summary = _metrics(launcher, record)
    state = job_state(statuses, record.stop_requested_at is not None)
    table = Table(title=f"{record.task_type} job {record.run_id}: {state.value}")
    for column in ("host", "state", "pgid", "processes", "elapsed", "exit"):
        table.add_column(column)
    for status, host_record in zip(statuses, record.hosts):
        elapsed = time.time() - host_record.started_at
        table.add_row(status.host.name, status.state.value, str(host_record.pgid or "?"), str(len(status.pids)),
                      f"{elapsed:,.0f}s", "" if status.exit_code is None else str(status.exit_code))
    console.print(table)
    for status in statuses:
        if status.error:
            console.print(f"host {status.host.name}: {status.error}")
    console.print(f"progress: {describe(summary)}")
    for name, url in record.info.get("urls", {}).items():
        console.print(f"serving {name}: {url}")
    console.print(f"log: {record.hosts[0].log_path}")
    return 0 if state is not JobState.FAILED else 1


def watch_job(exp_dir: str | Path) -> int:
    """Live progress of a recorded job until it ends (Ctrl-C leaves it running)."""
    record = load_record(exp_dir)
    with Launcher.from_settings(record.settings) as launcher:
        try:
            state = _follow(launcher, record)
        except KeyboardInterrupt:
            return 0
        except HostsUnreachable as lost:
            _explain_unreachable(f"flagscale stop {shlex.quote(str(record.exp_dir))}", lost, stopped_others=False)
            return 1
        summary = _metrics(launcher, record)
    console.print(f"job {record.run_id}: {state.value}; {describe(summary)}")
    return 0 if state is JobState.COMPLETED else 1


def auto_tune(job: JobConfig) -> int:
    from flagscale.auto_tuner import auto_tune as run_auto_tune  # on demand: the tuner imports this module

    return run_auto_tune(job)


def _refuse_if_running(job: JobConfig) -> None:
    if not record_path(job.exp_dir).is_file():
        return
    try:
        previous = load_record(job.exp_dir)
    except JobRecordError:
        return
    with Launcher.from_settings(previous.settings) as launcher:
        state = launcher.job_state(previous)
    if state in (JobState.RUNNING, JobState.UNKNOWN):
        raise FlagScaleError(
            f"job {previous.run_id} in {job.exp_dir} is {state.value}; stop it first "
            f"(python run.py {_config_args(job)} action=stop) or use another experiment.exp_dir"
        )


def _record_base(job: JobConfig, plan: Plan) -> dict:
    return {
        "run_id": plan.run_id, "task_type": plan.task_type, "exp_name": job.experiment.exp_name,
        "exp_dir": plan.exp_dir, "log_dir": plan.log_dir, "created_at": time.time(),
        "settings": launcher_settings(job), "master_addr": plan.master_addr, "master_port": plan.master_port,
        "after_stop": plan.after_stop, "info": plan.info,
    }


def _save_config(job: JobConfig, plan: Plan) -> None:
    private_dirs(plan.log_dir)
    write_private(Path(plan.log_dir) / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(job.raw)))


def _config_args(job: JobConfig) -> str:
    source = job.source
    if source.config_dir is None:
        return f"experiment.exp_dir={shlex.quote(str(job.exp_dir))}"
    overrides = [o for o in source.overrides if not o.startswith("action=")]
    return shlex.join(["--config-path", str(source.config_dir), "--config-name", source.config_name or "",
                       *overrides])


# A rank's own error line in a torchrun log: `[default3]:error: ...` or the last line of a traceback.
RANK_ERROR = re.compile(r"^\[default\d+\]:((error: .*)|([A-Za-z_.]*(Error|Exception)\b.*))$")


def _tail(path: str, lines: int = 15) -> str:
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
