"""The launcher: starts a Plan's processes on their hosts in parallel, and stops and queries
recorded jobs. Local and SSH hosts differ only in their Transport; every host-side action
goes through hostctl.py, so there is one process-control path."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from flagscale.config.hostfile import Host
from flagscale.exceptions import FlagScaleError, LaunchError
from flagscale.launcher.transport import SSHSettings, Transport, open_transport
from flagscale.record import HostRecord, JobRecord, JobState
from flagscale.runner.plan import Plan, ProcessSpec, render_script

HOSTCTL = Path(__file__).with_name("hostctl.py").read_text()
START_GRACE_S = 0.5
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
        return json.loads(lines[-1])

    def connect_all(self, hosts: list[Host], master: Host, port: int | None) -> int:
        """Open every host's connection at once (an unreachable host fails here, before anything
        starts) while the master host is asked for a free rendezvous port; returns that port."""

        def reach(host: Host) -> int | None:
            if host == master:
                return self.free_port(host, port)
            connect = getattr(self.transport(host), "connect", None)
            if connect is not None:
                connect()
            return None

        outcomes = parallel(hosts, reach)
        failed = [(h, o) for h, o in zip(hosts, outcomes) if isinstance(o, Exception)]
        if failed:
            raise LaunchError(f"cannot reach {len(failed)} of {len(hosts)} host(s); nothing was started:\n"
                              + "\n".join(f"  {h.name}: {err}" for h, err in failed))
        return next(o for h, o in zip(hosts, outcomes) if h == master)  # type: ignore[return-value]

    def free_port(self, host: Host, port: int | None) -> int:
        """A rendezvous port that is free on `host` itself (the requested one, or any)."""
        answer = self.hostctl(host, "port", str(port or 0))
        if "error" in answer:
            raise LaunchError(
                f"host {host.name}: {answer['error']}; set experiment.runner.master_port to a free port "
                "or remove it to let FlagScale pick one"
            )
        return int(answer["port"])

    def launch(self, plan: Plan, record_base: dict[str, Any]) -> JobRecord:
        """Start every host's script; if any host fails, stop those that started and raise."""
        for spec in plan.processes if self.shared_fs else []:
            _write_local(plan.script_path(spec), render_script(plan, spec))
        outcomes = parallel(plan.processes, lambda spec: self._start_one(plan, spec))
        started = [o for o in outcomes if isinstance(o, HostRecord)]
        failed = [(spec, o) for spec, o in zip(plan.processes, outcomes) if isinstance(o, Exception)]
        record = JobRecord(hosts=started, **record_base)
        if failed:
            self.stop(record, timeout=5)
            lines = [f"  {spec.host.name}: {err}" for spec, err in failed]
            cleanup = f"; stopped the {len(started)} host(s) that had started" if started else ""
            raise LaunchError(f"launch failed on {len(failed)} of {len(plan.processes)} host(s){cleanup}:\n"
                              + "\n".join(lines))
        return record

    def _start_one(self, plan: Plan, spec: ProcessSpec) -> HostRecord:
        script = plan.script_path(spec)
        if not self.shared_fs:
            self.transport(spec.host).write_file(script, render_script(plan, spec))
        answer = self.hostctl(spec.host, "start", script, spec.log_path, str(START_GRACE_S))
        if answer["exited"] not in (None, 0):
            tail = "\n    ".join(answer.get("tail", "").strip().splitlines()[-5:])
            raise LaunchError(f"exited at once with status {answer['exited']} (log {spec.log_path}):\n    {tail}")
        return HostRecord(host=spec.host, node_rank=spec.node_rank, pgid=int(answer["pgid"]), script=script,
                          log_path=spec.log_path, exit_file=spec.exit_file, started_at=time.time())

    def stop(self, record: JobRecord, timeout: float = 15) -> list[StopResult]:
        """TERM -> wait -> KILL the recorded groups of hosts not yet stopped; then after_stop."""
        record.mark_stop_requested()
        pending = [h for h in record.hosts if h.stopped_at is None]
        results = parallel(pending, lambda h: self._stop_one(h, timeout, record.after_stop))
        out: list[StopResult] = []
        for host_record, result in zip(pending, results):
            if isinstance(result, Exception):
                out.append(StopResult(host=host_record.host, error=str(result)))
                continue
            if not result.remaining:
                host_record.stopped_at = time.time()
            out.append(result)
        return out

    def _stop_one(self, host_record: HostRecord, timeout: float, after_stop: list[str]) -> StopResult:
        answer = self.hostctl(host_record.host, "stop", str(host_record.pgid), str(timeout),
                              timeout=timeout + 30)
        result = StopResult(host=host_record.host, found=answer["found"], killed=answer["killed"],
                            remaining=answer["remaining"])
        if after_stop and not result.remaining:
            done = self.transport(host_record.host).run(["bash", "-c", "\n".join(after_stop)], timeout=300)
            if done.returncode != 0:
                result.error = f"after_stop exited {done.returncode}: {done.stderr.strip()[-300:]}"
        return result

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
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text(text)
                copied.append(str(local))
        return copied

    def job_state(self, record: JobRecord) -> JobState:
        """The recorded job's state now, from every host."""
        return job_state(self.status(record), record.stop_requested_at is not None)

    def status(self, record: JobRecord) -> list[HostStatus]:
        results = parallel(record.hosts, self._status_one)
        return [
            r if isinstance(r, HostStatus) else HostStatus(host=h.host, state=JobState.UNKNOWN, error=str(r))
            for h, r in zip(record.hosts, results)
        ]

    def _status_one(self, host_record: HostRecord) -> HostStatus:
        answer = self.hostctl(host_record.host, "status", str(host_record.pgid), host_record.exit_file)
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


def _write_local(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    Path(path).chmod(0o755)
