"""The launcher: starts a Plan's processes on their hosts in parallel, and stops and queries
recorded jobs. Local and SSH hosts differ only in their Transport; every host-side action
goes through hostctl.py, so there is one process-control path."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from flagscale.config.hostfile import Host
from flagscale.exceptions import FlagScaleError, HostsNotReached, LaunchError
from flagscale.launcher.transport import SSHSettings, Transport, open_transport
from flagscale.spec.plan import Plan, ProcessSpec, render_script
from flagscale.spec.private import SCRIPT_MODE, private_dirs, write_private
from flagscale.spec.record import HostRecord, JobRecord, JobState, LauncherSettings

HOSTCTL = Path(__file__).with_name("hostctl.py").read_text()
START_GRACE_S = 0.5
START_TIMEOUT_S = 60.0
T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True, kw_only=True)
class HostStatus:
    host: Host
    state: JobState
    pids: list[int] = field(default_factory=list)
    exit_code: int | None = None
    error: str | None = None


@dataclass(slots=True, kw_only=True)
class HostFacts:
    """What the hosts said before the launch: the master's free rendezvous port, each host's visible devices."""

    port: int | None
    """None: chosen where the job runs (a Slurm job's first node)."""
    devices: dict[Host, int | None]


@dataclass(slots=True, kw_only=True)
class StopResult:
    host: Host
    found: int = 0
    killed: int = 0
    remaining: list[int] = field(default_factory=list)
    error: str | None = None


class Launcher:
    """Holds one connection per host for the duration of an action."""

    def __init__(self, *, ssh: SSHSettings, python: str, shared_fs: bool = True) -> None:
        self.ssh = ssh
        self.python = python
        self.shared_fs = shared_fs
        self._transports: dict[tuple[str, int | None], Transport] = {}

    @classmethod
    def from_settings(cls, settings: LauncherSettings) -> Launcher:
        """The launcher a job record's settings describe: SSH fan-out (local hosts included), or Slurm."""
        if settings.executor == "slurm":
            from flagscale.launcher.slurm import SlurmLauncher

            return SlurmLauncher(settings)
        ssh = SSHSettings(port=settings.ssh_port, strict_host_key_checking=settings.strict_host_key_checking,
                          connect_timeout=settings.connect_timeout)
        return cls(ssh=ssh, python=settings.python, shared_fs=not settings.no_shared_fs)

    def transport(self, host: Host) -> Transport:
        key = (host.name, host.port)
        if key not in self._transports:
            self._transports[key] = open_transport(host, self.ssh)
        return self._transports[key]

    def close(self) -> None:
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def hostctl(self, host: Host, *args: str, timeout: float = 60) -> dict[str, Any]:
        """Run one hostctl verb on a host and return its JSON answer."""
        transport = self.transport(host)
        # -S: hostctl needs only the standard library, and skipping site saves start-up time on every host
        result = transport.run([self.python, "-S", "-c", HOSTCTL, *args], timeout=timeout)
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines:
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise LaunchError(f"host {host.name} ({transport.target}): '{self.python}' failed: {detail}")
        try:
            answer = json.loads(lines[-1])
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise LaunchError(f"host {host.name} ({transport.target}): the host controller answered {lines[-1]!r}, "
                              f"not a JSON object; check that '{self.python}' there is Python 3")
        return answer

    def connect_all(self, hosts: list[Host], master: Host, port: int | None,
                    job_env: Callable[[Host], dict[str, str]]) -> HostFacts:
        """Ask every host at once (an unreachable host fails here, before anything starts) which devices it
        sees under the job's environment (`job_env(host)`: the *_VISIBLE_DEVICES the job sets there), and
        the master host for a free rendezvous port."""
        outcomes = parallel(hosts, lambda host: self._probe(host, str(port or 0) if host == master else "-",
                                                            job_env(host)))
        failed = [(h, o) for h, o in zip(hosts, outcomes) if isinstance(o, Exception)]
        if failed:
            raise HostsNotReached(f"cannot reach {len(failed)} of {len(hosts)} host(s); nothing was started:\n"
                                  + "\n".join(f"  {h.name}: {err}" for h, err in failed), [h.name for h, _ in failed])
        answers = dict(zip(hosts, outcomes))
        devices = {h: _device_count(h, a) for h, a in answers.items()}  # type: ignore[arg-type]
        return HostFacts(port=int(answers[master]["port"]), devices=devices)  # type: ignore[index]

    def _probe(self, host: Host, port: str, job_env: dict[str, str]) -> dict[str, Any]:
        """hostctl `probe` on one host; with a port (the master's: a number, 0 for any), it must be free there."""
        assignments = [f"{k}={v}" for k, v in job_env.items()]
        answer = self.hostctl(host, "probe", port, *assignments)
        if "error" in answer:
            raise LaunchError(
                f"host {host.name}: {answer['error']}; set experiment.runner.master_port to a free port "
                "or remove it to let FlagScale pick one"
            )
        return answer

    def check_ports(self, plan: Plan) -> None:
        """Every port the plan listens on must be free on its host (hostctl `port`), before anything starts."""
        for check in plan.ports_to_check:
            answer = self.hostctl(check.host, "port", str(check.port))
            if "error" in answer:
                raise LaunchError(f"host {check.host.name}: {answer['error']}; nothing was started. {check.fix}")

    def submit_command(self, plan: Plan) -> list[str] | None:
        """The command that hands the written scripts to a scheduler (None: each host's script is started)."""
        return None

    def scheduler(self, record: JobRecord) -> Any:
        """What a scheduler says of the job (None: no scheduler; see SlurmLauncher.scheduler)."""
        return None

    def resolve(self, record: JobRecord, text: str) -> str | None:
        """`text` with the values the running job chose filled in (None: not known yet); nothing to fill here."""
        return text

    def launch(self, plan: Plan, record_base: dict[str, Any]) -> JobRecord:
        """Start every host's script and save the job record. Whatever ends the launch early (a host that
        fails, a malformed answer, a time-out, Ctrl-C), the hosts that started are stopped and the record is
        still saved, so a later `stop` reaches anything this one could not."""
        record = JobRecord(hosts=[], **record_base)
        started: dict[int, HostRecord] = {}
        try:
            if self.shared_fs:
                self.write_scripts(plan)
            outcomes = parallel(list(enumerate(plan.processes)), lambda item: self._start_one(plan, *item, started))
        except BaseException:
            self._roll_back_start(plan, record, started)
            raise
        failed = [(spec, o) for spec, o in zip(plan.processes, outcomes) if isinstance(o, Exception)]
        if failed:
            self._roll_back_start(plan, record, started)
            lines = [f"  {spec.host.name}: {err}" for spec, err in failed]
            raise LaunchError(f"launch failed on {len(failed)} of {len(plan.processes)} host(s)"
                              f"{_cleanup_note(record)}:\n" + "\n".join(lines))
        record.hosts = [started[i] for i in sorted(started)]
        record.save()
        return record

    def write_scripts(self, plan: Plan) -> list[str]:
        """Every host's script, written here (owner only): what a launch on a shared file system starts, and
        what a dryrun shows. Returns their paths."""
        private_dirs(plan.log_dir, plan.scripts_dir)
        for spec in plan.processes:
            write_private(plan.script_path(spec), render_script(plan, spec), SCRIPT_MODE)
        return [plan.script_path(spec) for spec in plan.processes]

    def _start_one(self, plan: Plan, index: int, spec: ProcessSpec, started: dict[int, HostRecord]) -> HostRecord:
        """Start one host's script; its record goes into `started` as soon as the host reports a process."""
        script = plan.script_path(spec)
        if not self.shared_fs:
            self.transport(spec.host).write_file(script, render_script(plan, spec), SCRIPT_MODE,
                                                 private=(plan.log_dir, plan.scripts_dir))
        answer = self.hostctl(spec.host, "start", script, spec.log_path, spec.pid_file, str(START_GRACE_S),
                              timeout=START_TIMEOUT_S)
        host_record = _host_record(spec, script, answer)
        started[index] = host_record
        if answer["exited"] not in (None, 0):
            tail = "\n    ".join(str(answer.get("tail", "")).strip().splitlines()[-5:])
            raise LaunchError(f"exited at once with status {answer['exited']} (log {spec.log_path}):\n    {tail}")
        return host_record

    def _roll_back_start(self, plan: Plan, record: JobRecord, started: dict[int, HostRecord]) -> None:
        """Record every process the launch may have started (found through its pid file when the host's answer
        was lost), stop them, and save the record whatever happens."""
        try:
            for index, spec in enumerate(plan.processes):
                if index not in started:
                    found = self._started_unseen(plan, spec)
                    if found is not None:
                        started[index] = found
            record.hosts = [started[i] for i in sorted(started)]
            self.stop(record, timeout=5)
        finally:
            if record.hosts:
                record.save()

    def _started_unseen(self, plan: Plan, spec: ProcessSpec) -> HostRecord | None:
        """A host whose start did not report: its process from the pid file, None if it never started, or a
        record without pgid (to be resolved by a later `stop`) if the host cannot be asked now."""
        unresolved = HostRecord(host=spec.host, node_rank=spec.node_rank, pgid=None, script=plan.script_path(spec),
                                log_path=spec.log_path, exit_file=spec.exit_file, started_at=time.time(),
                                pid_file=spec.pid_file)
        try:
            return unresolved if self._resolve(unresolved) else None
        except FlagScaleError:
            return unresolved

    def _resolve(self, host_record: HostRecord) -> bool:
        """Fill in pgid and start time from the pid file if the record lacks them; False: nothing was started."""
        if host_record.pgid is not None:
            return True
        text = self.transport(host_record.host).read_text(host_record.pid_file) if host_record.pid_file else None
        if text is None:
            return False
        try:
            ident = json.loads(text)
            host_record.pgid, host_record.start_time = int(ident["pgid"]), ident.get("start")
        except (ValueError, KeyError, TypeError):
            raise LaunchError(f"host {host_record.host.name}: {host_record.pid_file} is not a pid file "
                              f"({text[:80]!r}); check that process group by hand") from None
        return True

    def roll_back(self, record: JobRecord, timeout: float = 5) -> None:
        """Stop a job whose launch did not finish, and save its record whatever happens."""
        try:
            self.stop(record, timeout)
        finally:
            record.save()

    def stop(self, record: JobRecord, timeout: float = 15) -> list[StopResult]:
        """TERM -> wait -> KILL the recorded groups of hosts not yet stopped; then after_stop. Each host that
        was stopped is marked at once, so a failure elsewhere does not make a later `stop` repeat it."""
        record.mark_stop_requested()
        pending = [h for h in record.hosts if h.stopped_at is None]
        results = parallel(pending, lambda h: self._stop_one(h, timeout, record.after_stop))
        return [StopResult(host=h.host, error=str(r)) if isinstance(r, Exception) else r
                for h, r in zip(pending, results)]

    def _stop_one(self, host_record: HostRecord, timeout: float, after_stop: list[str]) -> StopResult:
        if not self._resolve(host_record):  # its start never began: nothing to stop there
            host_record.stopped_at = time.time()
            return StopResult(host=host_record.host)
        answer = self.hostctl(host_record.host, "stop", *_identity(host_record), str(timeout), timeout=timeout + 30)
        result = StopResult(host=host_record.host, found=answer["found"], killed=answer["killed"],
                            remaining=answer["remaining"])
        if result.remaining:
            return result
        host_record.stopped_at = time.time()
        if after_stop:
            done = self.transport(host_record.host).run(["bash", "-c", "\n".join(after_stop)], timeout=300)
            if done.returncode != 0:
                result.error = f"after_stop exited {done.returncode}: {done.stderr.strip()[-300:]}"
        return result

    def stacks(self, record: JobRecord) -> tuple[list[str], list[str]]:
        """Save the Python stack of every process of the job on every host (py-spy, without pausing them) under
        <log dir>/stacks/ (on each host; here too on a shared file system); (files, one error line per host)."""
        out = str(Path(record.log_dir) / "stacks")

        def one(host_record: HostRecord) -> dict[str, Any]:
            if not self._resolve(host_record):
                return {"files": [], "error": None}
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", host_record.host.name)
            return self.hostctl(host_record.host, "stacks", *_identity(host_record), out, safe, timeout=300)

        files: list[str] = []
        errors: list[str] = []
        for host_record, answer in zip(record.hosts, parallel(record.hosts, one)):
            if isinstance(answer, Exception):
                errors.append(f"host {host_record.host.name}: {answer}")
                continue
            files += answer["files"]
            if answer.get("error"):
                errors.append(f"host {host_record.host.name}: {answer['error']}")
        return files, errors

    def read_text(self, record: JobRecord, path: str) -> str | None:
        """A job file wherever it is: here on a shared file system, else on the first host that has it
        (last host first: it holds the last pipeline stage, which writes the metrics)."""
        if self.shared_fs or not record.hosts:
            return self.transport(record.hosts[0].host).read_text(path) if record.hosts else None
        for host_record in reversed(record.hosts):
            try:
                text = self.transport(host_record.host).read_text(path)
            except FlagScaleError:
                continue
            if text is not None:
                return text
        return None

    def collect_logs(self, record: JobRecord) -> list[str]:
        """Without a shared file system, copy each host's log into this machine's log folder."""
        if self.shared_fs:
            return []
        copied = []
        for host_record in record.hosts:
            local = Path(host_record.log_path)
            if local.exists():
                continue
            try:
                text = self.transport(host_record.host).read_text(host_record.log_path)
            except FlagScaleError:
                continue
            if text is not None:
                private_dirs(local.parent)
                write_private(local, text)
                copied.append(str(local))
        return copied

    def job_state(self, record: JobRecord) -> JobState:
        """The recorded job's state now, from every host."""
        return self.state_of(record, self.status(record))

    def state_of(self, record: JobRecord, statuses: list[HostStatus]) -> JobState:
        """The job's state from its hosts' states (just asked with `status`)."""
        return job_state(statuses, record.stop_requested_at is not None)

    def status(self, record: JobRecord) -> list[HostStatus]:
        results = parallel(record.hosts, self._status_one)
        return [
            r if isinstance(r, HostStatus) else HostStatus(host=h.host, state=JobState.UNKNOWN, error=str(r))
            for h, r in zip(record.hosts, results)
        ]

    def _status_one(self, host_record: HostRecord) -> HostStatus:
        if not self._resolve(host_record):
            state = JobState.STOPPED if host_record.stopped_at is not None else JobState.FAILED
            return HostStatus(host=host_record.host, state=state)  # its launch never started it
        answer = self.hostctl(host_record.host, "status", *_identity(host_record), host_record.exit_file)
        pids, code = answer["pids"], answer["exit_code"]
        if pids:
            state = JobState.RUNNING
        elif code == 0:
            state = JobState.COMPLETED
        elif host_record.stopped_at is not None:
            state = JobState.STOPPED
        else:
            state = JobState.FAILED
        return HostStatus(host=host_record.host, state=state, pids=pids, exit_code=code)


def job_state(statuses: Iterable[HostStatus], stop_requested: bool) -> JobState:
    """The job's state from its hosts' states."""
    states = [s.state for s in statuses]
    if not states:
        return JobState.UNKNOWN
    if all(s is JobState.COMPLETED for s in states):
        return JobState.COMPLETED
    if JobState.RUNNING in states:
        return JobState.FAILED if JobState.FAILED in states else JobState.RUNNING
    if JobState.PENDING in states:
        return JobState.PENDING
    if stop_requested and JobState.UNKNOWN not in states:
        return JobState.STOPPED
    if JobState.FAILED in states:
        return JobState.FAILED
    return JobState.UNKNOWN


def parallel(items: list[T], work: Callable[[T], R]) -> list[R | Exception]:
    """Run `work` for every item at once; a FlagScaleError becomes that item's result."""
    if not items:
        return []

    def guarded(item: T) -> R | Exception:
        try:
            return work(item)
        except FlagScaleError as err:
            return err

    with ThreadPoolExecutor(max_workers=min(64, len(items))) as pool:
        return list(pool.map(guarded, items))


def _host_record(spec: ProcessSpec, script: str, answer: dict[str, Any]) -> HostRecord:
    """The record of a started host from the host controller's answer to `start`."""
    try:
        pgid, start, exited = int(answer["pgid"]), answer["start"], answer["exited"]
    except (KeyError, ValueError, TypeError):
        raise LaunchError(f"the host controller's answer to start lacks pid/pgid/start/exited ({answer}); the "
                          f"process is found through {spec.pid_file}") from None
    if exited is not None and not isinstance(exited, int):
        raise LaunchError(f"the host controller's answer to start has exited={exited!r}; not an exit status")
    return HostRecord(host=spec.host, node_rank=spec.node_rank, pgid=pgid, start_time=start, script=script,
                      log_path=spec.log_path, exit_file=spec.exit_file, started_at=time.time(),
                      pid_file=spec.pid_file)


def _device_count(host: Host, answer: dict[str, Any]) -> int | None:
    devices = answer.get("devices")
    try:
        return None if devices is None else int(devices["count"])
    except (KeyError, TypeError, ValueError):
        raise LaunchError(f"host {host.name}: the host controller's device report {devices!r} is malformed; "
                          "check that the same FlagScale runs there") from None


def _identity(host_record: HostRecord) -> tuple[str, str, str]:
    """PGID START SCRIPT, by which the host controller tells the launch's processes from a recycled pgid."""
    start = "-" if host_record.start_time is None else str(host_record.start_time)
    return str(host_record.pgid), start, host_record.script


def _cleanup_note(record: JobRecord) -> str:
    """What the roll-back did, for the launch error."""
    if not record.hosts:
        return ""
    left = [h.host.name for h in record.hosts if h.stopped_at is None]
    if not left:
        return f"; stopped the {len(record.hosts)} process(es) that had started"
    return (f"; could not stop what started on {', '.join(left)}: run action=stop once the host answers "
            f"(recorded in {record.path})")

