"""The actions (dryrun, run, test, stop, query): one path for every task type.
dryrun is literally the first half of run: the same plan, rendered and written, not started."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flagscale import jobs
from flagscale.config.loader import JobConfig
from flagscale.launcher.launcher import Launcher, job_state
from flagscale.runner.metrics import HostsUnreachable, MetricsSummary, describe, follow_progress
from flagscale.spec.plan import render_script
from flagscale.spec.private import SCRIPT_MODE, private_dirs, write_private
from flagscale.spec.record import JobRecord, JobState, load_record

console = Console(highlight=False, soft_wrap=True)
FOLLOW_INTERVAL_S = 2.0
UNREACHABLE_GIVE_UP_S = 120.0
"""`test` and `status --watch` end once a host has not answered for this long (instead of polling for ever)."""


def dispatch(job: JobConfig) -> int:
    """Carry out `job.action`; returns the process exit code."""
    handlers = {"dryrun": dryrun, "run": run, "test": test, "stop": stop, "query": query,
                "auto_tune": auto_tune}
    return handlers[job.action](job)


def dryrun(job: JobConfig) -> int:
    runner, ctx = jobs.prepare(job)
    plan = runner.plan(ctx)
    launcher = Launcher.from_settings(jobs.launcher_settings(job))
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


def launch(job: JobConfig) -> JobRecord:
    """jobs.launch, with its notes printed and a spinner while a server comes up."""
    with console.status("launching") as spinner:
        return jobs.launch(job, on_note=lambda note: console.print(f"note: {note}", markup=False),
                           on_wait=spinner.update)


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
    config_arg = jobs.config_args(job)
    console.print(f"  follow: tail -f {shlex.quote(first.log_path)}   (or: flagscale logs -f {record.exp_dir})")
    console.print(f"  query:  python run.py {config_arg} action=query")
    console.print(f"  stop:   python run.py {config_arg} action=stop")
    return 0


def test(job: JobConfig) -> int:
    """Run in the foreground: progress until the job ends; Ctrl-C stops it. Exit code = the job's. A training
    job that fails is launched again while experiment.runner.max_restarts allows and a restart can help."""
    from flagscale.supervisor.restart import RestartPolicy, Supervision

    policy = RestartPolicy.of(job.experiment.runner) if job.experiment.task.type == "train" else RestartPolicy()
    supervision = Supervision(policy)
    while True:
        record = launch(job)
        supervision.launched(record)
        console.print(f"started {record.run_id}; log: {record.hosts[0].log_path}")
        code, final = _foreground(job, record)
        if final is None or final.state is not JobState.FAILED:
            if final is not None:
                supervision.ended(record, final)
            return code
        decision = supervision.after_failure(record, final)
        console.print(f"diagnosis: {decision.diagnosis.detail}; {decision.reason}", markup=False)
        if not decision.restart:
            return code
        try:
            jobs.stop(record.exp_dir)  # whatever a failed rank left behind on any host
            time.sleep(policy.backoff_s)
        except KeyboardInterrupt:
            console.print("interrupted before the restart; nothing is running")
            return 130


def _foreground(job: JobConfig, record: JobRecord) -> tuple[int, jobs.JobStatus | None]:
    """Follow one launch to its end; (exit code, final status), the status None when Ctrl-C or a silent host
    ended it (the job is then stopped)."""
    with Launcher.from_settings(record.settings) as launcher:
        try:
            state = _follow(launcher, record)
        except KeyboardInterrupt:
            console.print("interrupted: stopping the job")
            launcher.stop(record, record.settings.stop_timeout)
            record.save()
            return 130, None
        except HostsUnreachable as lost:
            launcher.stop(record, record.settings.stop_timeout)
            record.save()
            _explain_unreachable(f"python run.py {jobs.config_args(job)} action=stop", lost, stopped_others=True)
            return 1, None
        final = jobs.status_of(launcher, record)
        final.state = state
        launcher.collect_logs(record)
    return _finish(record, state, final.hosts, final.metrics), final


def _follow(launcher: Launcher, record: JobRecord) -> JobState:
    """Live progress until the job ends; returns its final state (HostsUnreachable if a host stays silent)."""

    def poll() -> tuple[JobState, list[str]]:
        statuses = launcher.status(record)
        problems = [_named(s.host.name, s.error) for s in statuses if s.error]
        return job_state(statuses, record.stop_requested_at is not None), problems

    return follow_progress(console, lambda: jobs.metrics(launcher, record), poll, interval=FOLLOW_INTERVAL_S,
                           give_up_s=UNREACHABLE_GIVE_UP_S)


def _named(host: str, error: str) -> str:
    return error if error.startswith(f"host {host}") else f"host {host}: {error}"


def _explain_unreachable(retry: str, lost: HostsUnreachable, stopped_others: bool) -> None:
    """One line per silent host: which, why, and what to run (`retry`) once it answers again."""
    done = "; stopped the job on the hosts that answer" if stopped_others else ""
    for problem in lost.problems:
        console.print(f"{problem} (unreachable for {lost.seconds:.0f}s{done}); once it answers, end its part of "
                      f"the job: {retry}", markup=False)


def _finish(record: JobRecord, state: JobState, statuses: list, summary: MetricsSummary | None) -> int:
    console.print(f"job {record.run_id}: {state.value}; {describe(summary)}")
    if state is JobState.COMPLETED:
        return 0
    for status, host_record in zip(statuses, record.hosts):
        if status.state is JobState.FAILED:
            console.print(f"host {status.host.name} failed (exit {status.exit_code}); last lines of "
                          f"{host_record.log_path}:")
            console.print(jobs.log_tail(host_record.log_path), markup=False)
    codes = [s.exit_code for s in statuses if s.exit_code]
    return codes[0] if codes else 1


def stop(job: JobConfig) -> int:
    return stop_job(job.exp_dir)


def stop_job(exp_dir: str | Path) -> int:
    """Stop the job recorded in exp_dir on every host and say what happened; a later call retries hosts not
    reached."""
    report = jobs.stop(exp_dir)
    run_id = report.record.run_id
    if report.already_stopped:
        console.print(f"job {run_id}: already stopped; nothing to do")
        return 0
    for result in report.results:
        if result.error:
            console.print(f"host {result.host.name}: [red]{result.error}[/] (run stop again to retry)")
        else:
            console.print(f"host {result.host.name}: ended {result.found} process(es)"
                          + (f", {result.killed} needed SIGKILL" if result.killed else ""))
    if report.unreached:
        console.print(f"job {run_id}: {len(report.unreached)} host(s) not reached")
        return 1
    console.print(f"job {run_id}: " + ("had already ended; nothing was signalled" if report.had_ended else "stopped"))
    return 0


def query(job: JobConfig) -> int:
    return query_job(job.exp_dir)


def query_job(exp_dir: str | Path) -> int:
    """Print each host's state once, with progress from the metrics file."""
    now = jobs.status(exp_dir)
    record, state, statuses, summary = now.record, now.state, now.hosts, now.metrics
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
    if state is JobState.FAILED:
        from flagscale.supervisor.restart import diagnose_job

        console.print(f"diagnosis: {diagnose_job(record, now).detail}", markup=False)
    supervisor = record.info.get("supervisor")
    if supervisor:
        console.print(f"restarts before this run: {supervisor['restarts']}; last failure: {supervisor['diagnosis']} "
                      f"(events: {supervisor['events']})", markup=False)
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
        summary = jobs.metrics(launcher, record)
    console.print(f"job {record.run_id}: {state.value}; {describe(summary)}")
    return 0 if state is JobState.COMPLETED else 1


def auto_tune(job: JobConfig) -> int:
    from flagscale.auto_tuner import auto_tune as run_auto_tune  # on demand: it imports torch-free but large modules

    return run_auto_tune(job, run_job=run)
