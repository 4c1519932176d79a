"""The actions (dryrun, run, test, stop, query): one path for every task type.
dryrun is literally the first half of run: the same plan, rendered and written, not started."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flagscale import jobs
from flagscale.config.loader import JobConfig
from flagscale.exceptions import FlagScaleError, HostsNotReached
from flagscale.launcher.launcher import Launcher
from flagscale.runner.metrics import HostsUnreachable, MetricsSummary, describe, follow_progress
from flagscale.spec.plan import shell_join
from flagscale.spec.process import is_alive, process_identity
from flagscale.spec.record import JobRecord, JobState, load_record
from flagscale.supervisor.restart import RestartPolicy, Supervision, diagnose_job, goodput, read_events

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
    """Plan and write the scripts exactly as `run` would (through the same launcher), and start nothing."""
    runner, ctx = jobs.prepare(job)
    plan = runner.plan(ctx)
    launcher = Launcher.from_settings(jobs.launcher_settings(job))
    written = launcher.write_scripts(plan)
    submit = launcher.submit_command(plan)
    for spec in plan.processes:
        if submit is not None:
            where = f"{spec.host.name} (the node with SLURM_NODEID {spec.node_rank})"
            console.print(f"[bold]node {where}[/]")
        else:
            target = "local" if spec.host.is_local else launcher.transport(spec.host).target
            console.print(f"[bold]host {spec.host.name}[/] (node rank {spec.node_rank}, ssh target: {target})")
        console.print(f"  script: {plan.script_path(spec)}")
        if spec.container:
            console.print(f"  runs inside container {spec.container} (docker exec on {spec.host.name})")
        console.print(f"  command: {shell_join(spec.argv)}", soft_wrap=True, markup=False)
    if submit is not None:
        console.print(f"[bold]batch script[/] {written[-1]}:")
        console.print(Path(written[-1]).read_text().rstrip(), markup=False, soft_wrap=True)
        console.print(f"submit: {shlex.join(submit)}", markup=False)
    for note in plan.notes:
        console.print(f"note: {note}", markup=False)
    if plan.master_port is None:
        where = "on the first node, inside the job" if submit is not None else "at launch, free on the master host"
        console.print(f"note: the rendezvous port is chosen {where} (set experiment.runner.master_port to fix it)")
    if plan.task_type == "train" and submit is None:
        console.print("note: dryrun does not ask the hosts: processes per host are capped by slots and by the "
                      "*_VISIBLE_DEVICES that experiment.envs sets; at launch each host's own visible devices count")
    console.print("dryrun: nothing was started." + ("" if submit is None else " Nothing was submitted to Slurm."))
    return 0


def launch(job: JobConfig, exclude: Sequence[str] = (), relaunch: bool = False) -> JobRecord:
    """jobs.launch, with its notes printed and a spinner while a server comes up."""
    with console.status("launching") as spinner:
        return jobs.launch(job, on_note=lambda note: console.print(f"note: {note}", markup=False),
                           on_wait=spinner.update, exclude=exclude, relaunch=relaunch)


def run(job: JobConfig) -> int:
    supervised = RestartPolicy.of(job.experiment.runner, job.experiment.task.type).needs_supervisor
    if supervised and (job.source.config_dir is None or job.source.config_name is None):
        raise FlagScaleError("a supervised job (experiment.runner.max_restarts/hang_timeout) needs its config "
                             "from YAML files (--config-path/--config-name); nothing was started")
    record = launch(job)
    first = record.hosts[0]
    verb = "submitted" if record.info.get("slurm") else "started"
    console.print(f"[bold green]{verb}[/] {job.experiment.task.type} job {record.run_id} {_where(record)}")
    console.print(f"  experiment dir: {record.exp_dir}")
    if record.info.get("slurm"):
        console.print(f"  batch script: {record.info['slurm']['batch_script']}; its output: "
                      f"{record.info['slurm']['output']}")
    console.print(f"  log: {first.log_path}")
    for name, url in record.info.get("urls", {}).items():
        console.print(f"  serving {name}: {url}")
    if record.info.get("output_path"):
        console.print(f"  results: {record.info['output_path']}")
    if supervised:
        supervisor = _start_supervisor(job, record)
        console.print(f"  supervisor: pid {supervisor['pid']} restarts it on failure; its log: {supervisor['log']}")
    config_arg = jobs.config_args(job)
    console.print(f"  follow: tail -f {shlex.quote(first.log_path)}   (or: flagscale logs -f {record.exp_dir})")
    console.print(f"  query:  python run.py {config_arg} action=query")
    console.print(f"  stop:   python run.py {config_arg} action=stop")
    return 0


def _where(record: JobRecord) -> str:
    """`on 2 host(s)`, or `as Slurm job 12 (2 nodes)`."""
    if record.info.get("slurm"):
        return f"as Slurm job {record.info['slurm']['job_id']} ({len(record.hosts)} node(s))"
    return f"on {len(record.hosts)} host(s): {', '.join(h.host.name for h in record.hosts)}"


def _start_supervisor(job: JobConfig, record: JobRecord) -> dict:
    """Start the detached supervisor of a job just launched (`flagscale supervise`, in a session of its own, its
    output in <log dir>/supervisor.log) and record it in job.json, where `stop` finds it."""
    source = job.source
    assert source.config_dir is not None and source.config_name is not None
    log = Path(record.log_dir) / "supervisor.log"
    overrides = [o for o in source.overrides if not o.startswith("action=")]
    argv = [sys.executable, "-m", "flagscale.cli", "supervise", "--config-dir", str(source.config_dir),
            "--config-name", source.config_name, "--", *overrides]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    identity = {**process_identity(proc.pid), "log": str(log)}
    record.info["supervisor"] = {**record.info.get("supervisor", {}), **identity}
    record.save()
    return identity


def supervise_detached(job: JobConfig) -> int:
    """The supervisor process of a job started by action=run: adopt the job recorded in its exp_dir, follow it
    and restart it as the policy allows. SIGTERM (what `stop` sends) stops the job and ends it."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    deadline = time.monotonic() + 30
    while True:  # `run` names this process in job.json right after starting it
        record = load_record(job.exp_dir)
        if (record.info.get("supervisor") or {}).get("pid") == os.getpid():
            break
        if time.monotonic() > deadline:
            console.print(f"job.json in {job.exp_dir} does not name this supervisor (pid {os.getpid()}); exiting")
            return 2
        time.sleep(0.2)
    me = record.info["supervisor"]
    policy = RestartPolicy.of(job.experiment.runner, job.experiment.task.type)
    supervision = Supervision(policy, detached={"pid": me["pid"], "start": me["start"], "log": me["log"]})
    console.print(f"supervising {record.task_type} job {record.run_id} in {record.exp_dir}: max_restarts "
                  f"{policy.max_restarts}, hang_timeout {policy.hang_timeout_s}")
    return supervise(job, supervision, first=record)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def test(job: JobConfig) -> int:
    """Run in the foreground: progress until the job ends; Ctrl-C stops it. Exit code = the job's. A job that
    fails is launched again while experiment.runner.max_restarts allows and a restart can help."""
    return supervise(job, Supervision(RestartPolicy.of(job.experiment.runner, job.experiment.task.type)))


def supervise(job: JobConfig, supervision: Supervision, first: JobRecord | None = None) -> int:
    """Launch the job (or adopt `first`, already launched), follow it to its end, and launch it again after a
    failure while the supervision allows; returns the exit code of the last launch."""
    record, previous = first, first
    while True:
        if record is None:
            try:
                record = launch(job, exclude=supervision.lost_hosts, relaunch=True)
            except HostsNotReached as err:  # lost since: spares from the hostfile take their place, if any
                supervision.lost_hosts += [h for h in err.hosts if h not in supervision.lost_hosts]
                console.print(f"host(s) {', '.join(err.hosts)} cannot be reached; trying spare hosts", markup=False)
                continue
            except FlagScaleError as err:
                assert previous is not None
                supervision.gave_up(previous, str(err))
                console.print(f"cannot restart: {err}", markup=False)
                return 1
        supervision.launched(record)
        console.print(f"started {record.run_id} {_where(record)}; log: {record.hosts[0].log_path}", markup=False)
        code, final = _foreground(job, record, supervision)
        if final is None or final.state is not JobState.FAILED:
            if final is not None:
                supervision.ended(record, final.state)
            return code
        decision = supervision.after_failure(record, final)
        console.print(f"diagnosis: {decision.diagnosis.detail}; {decision.reason}", markup=False)
        if not decision.restart:
            supervision.ended(record, final.state)
            return code
        try:
            jobs.stop(record.exp_dir)  # whatever a failed rank left behind on any host
            time.sleep(supervision.policy.backoff_s)
        except KeyboardInterrupt:
            console.print("interrupted before the restart; nothing is running")
            supervision.ended(record, JobState.STOPPED)
            return 130
        previous, record = record, None


def _foreground(job: JobConfig, record: JobRecord,
                supervision: Supervision | None = None) -> tuple[int, jobs.JobStatus | None]:
    """Follow one launch to its end; (exit code, final status), the status None when Ctrl-C ended it (the job
    is then stopped). A host silent for too long ends it FAILED (stopped on the other hosts)."""
    with Launcher.from_settings(record.settings) as launcher:
        try:
            state = _follow(launcher, record, supervision)
        except KeyboardInterrupt:
            console.print("interrupted: stopping the job")
            launcher.stop(record, record.settings.stop_timeout)
            record.save()
            return 130, None
        except HostsUnreachable as lost:
            launcher.stop(record, record.settings.stop_timeout)
            record.stop_requested_at = None  # the supervisor stopped it: a failure, not the user's stop
            record.save()
            _explain_unreachable(f"python run.py {jobs.config_args(job)} action=stop", lost, stopped_others=True)
            state = JobState.FAILED
        final = jobs.status_of(launcher, record)
        final.state = state
        launcher.collect_logs(record)
    return _finish(record, state, final.hosts, final.metrics), final


def _follow(launcher: Launcher, record: JobRecord, supervision: Supervision | None = None) -> JobState:
    """Live progress until the job ends; returns its final state (HostsUnreachable if a host stays silent). The
    supervision's watchdog looks at every poll: a job it finds hung or unhealthy is stopped and ends FAILED."""
    latest: list[MetricsSummary | None] = [None]
    scheduler_said = [""]

    def read() -> MetricsSummary | None:
        latest[0] = jobs.metrics(launcher, record)
        return latest[0]

    def poll() -> tuple[JobState, list[str]]:
        statuses = launcher.status(record)
        view = launcher.scheduler(record)
        if view is not None and view.state != scheduler_said[0]:  # a Slurm job: each change of its state
            scheduler_said[0] = view.state
            console.print(view.line(), markup=False)
        problems = [_named(s.host.name, s.error) for s in statuses if s.error]
        state = launcher.state_of(record, statuses)
        watchdog = supervision.watchdog if supervision is not None else None
        problem = watchdog.check(state, latest[0]) if watchdog is not None else None
        if problem is None:
            return state, problems
        assert supervision is not None
        console.print(f"{problem}: stopping job {record.run_id}", markup=False)
        for line in supervision.intervene(launcher, record, problem):
            console.print(line, markup=False)
        return JobState.FAILED, []

    return follow_progress(console, read, poll, interval=FOLLOW_INTERVAL_S, give_up_s=UNREACHABLE_GIVE_UP_S)


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
    _show_failed_logs(record, statuses)
    codes = [s.exit_code for s in statuses if s.exit_code]
    return codes[0] if codes else 1


def _show_failed_logs(record: JobRecord, statuses: list) -> None:
    """The last lines of each failed host's log (and of a Slurm job's batch output)."""
    for status, host_record in zip(statuses, record.hosts):
        if status.error:
            console.print(_named(status.host.name, status.error), markup=False)
        if status.state is JobState.FAILED:
            console.print(f"host {status.host.name} failed (exit {status.exit_code}); last lines of "
                          f"{host_record.log_path}:", markup=False)
            console.print(jobs.log_tail(host_record.log_path), markup=False)
    output = (record.info.get("slurm") or {}).get("output")
    if output and Path(output).is_file():
        console.print(f"last lines of the batch job's output {output}:", markup=False)
        console.print(jobs.log_tail(output, lines=8), markup=False)


def stop(job: JobConfig) -> int:
    return stop_job(job.exp_dir)


def stop_job(exp_dir: str | Path) -> int:
    """Stop the job recorded in exp_dir on every host and say what happened; a later call retries hosts not
    reached."""
    report = jobs.stop(exp_dir)
    run_id = report.record.run_id
    if report.supervisor is not None:
        console.print(f"stopped the supervisor (pid {report.supervisor}) of job {run_id}; it stops no more")
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
    scheduled = now.scheduler is not None  # a Slurm job: its tasks' process groups are Slurm's to track
    for column in ("node", "state", "since", "exit") if scheduled else ("host", "state", "pgid", "processes",
                                                                         "elapsed", "exit"):
        table.add_column(column)
    for status, host_record in zip(statuses, record.hosts):
        elapsed = f"{time.time() - host_record.started_at:,.0f}s"
        code = "" if status.exit_code is None else str(status.exit_code)
        cells = [str(host_record.pgid or "?"), str(len(status.pids))] if not scheduled else []
        table.add_row(status.host.name, status.state.value, *cells, elapsed, code)
    console.print(table)
    if now.scheduler is not None:
        console.print(now.scheduler.line(), markup=False)
    for status in statuses:
        if status.error:
            console.print(f"host {status.host.name}: {status.error}")
    console.print(f"progress: {describe(summary)}")
    if state is JobState.FAILED:
        console.print(f"diagnosis: {diagnose_job(record, now).detail}", markup=False)
        _show_failed_logs(record, statuses)
    supervisor = record.info.get("supervisor")
    if supervisor:
        _show_supervision(supervisor)
    for name, url in record.info.get("urls", {}).items():
        console.print(f"serving {name}: {url}")
    console.print(f"log: {record.hosts[0].log_path}")
    return 0 if state is not JobState.FAILED else 1


def _show_supervision(supervisor: dict) -> None:
    """The supervisor's side of `query`: is it running, the restarts so far, the last failure, the goodput."""
    if "pid" in supervisor:
        running = "running" if is_alive(supervisor) else "not running"
        console.print(f"supervisor: pid {supervisor['pid']} ({running}); log: {supervisor.get('log')}", markup=False)
    last = f"; last failure: {supervisor['diagnosis']}" if supervisor.get("diagnosis") else ""
    lost = f"; lost hosts: {', '.join(supervisor['lost_hosts'])}" if supervisor.get("lost_hosts") else ""
    console.print(f"restarts: {supervisor.get('restarts', 0)}{last}{lost}", markup=False)
    figure = goodput(read_events(supervisor.get("events", "")))
    if figure is not None:
        console.print(f"goodput: {figure.ratio:.2f} ({figure.kept_s:,.0f}s of kept iterations in "
                      f"{figure.wall_s:,.0f}s; {figure.redone} iteration(s) redone)")
    console.print(f"events: {supervisor.get('events')}", markup=False)


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
