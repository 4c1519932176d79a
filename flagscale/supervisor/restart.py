"""Keeping a job alive: the policy from experiment.runner, the watchdog, and the decision after each failure.

While a job runs, the `Watchdog` looks at each status poll: a training job with no new iteration for
`hang_timeout` seconds while its processes live hangs; a server whose health check keeps failing is unhealthy.
`Supervision.intervene` then saves what the user needs (every rank's Python stack, for a hang) and stops it.
After a launch ends FAILED (or was stopped that way), `after_failure` diagnoses the cause from every host's
exit status and log (flagscale/supervisor/diagnosis.py), appends it to `<exp_dir>/logs/<first run id>/
events.jsonl`, keeps the restart count and the last diagnosis in job.json (`info.supervisor`), and says whether
to launch again: only while restarts are left and the cause is one a restart can cure (a killed or crashed
rank, a communication error, a lost host — replaced by a spare host from the hostfile when there is one —, a
hang, a dead server — not a configuration or data error that would fail the same way). The training program
resumes from the latest checkpoint with the data position, so a restart redoes at most one save interval.

Headless: the foreground (`action=test`) and the detached supervisor of `action=run` both drive it from
flagscale/runner/actions.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagscale.config.schema import RunnerConfig
from flagscale.jobs import JobStatus, answers
from flagscale.launcher.launcher import Launcher
from flagscale.runner.metrics import MetricsSummary, parse_metrics
from flagscale.spec.record import JobRecord, JobState
from flagscale.supervisor.diagnosis import Diagnosis, HostEvidence, Kind, diagnose

LOG_TAIL_BYTES = 64_000
STARTUP_ALLOWANCE = 4
"""Before a launch's first iteration (imports, data indexes, checkpoint load) a hang takes this many
hang_timeouts."""
UNHEALTHY_POLLS = 3
"""A server is restarted after this many health checks in a row failed while its processes run."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RestartPolicy:
    """experiment.runner.max_restarts / restart_backoff / hang_timeout, for one task type."""

    max_restarts: int = 0
    backoff_s: float = 10.0
    hang_timeout_s: float | None = None
    watch_health: bool = False
    """A server: restart it when its health check fails."""

    @classmethod
    def of(cls, runner: RunnerConfig, task_type: str) -> RestartPolicy:
        if task_type == "train":
            return cls(max_restarts=runner.max_restarts, backoff_s=runner.restart_backoff,
                       hang_timeout_s=runner.hang_timeout)
        if task_type == "serve":
            return cls(max_restarts=runner.max_restarts, backoff_s=runner.restart_backoff, watch_health=True)
        return cls()

    @property
    def needs_supervisor(self) -> bool:
        """Whether a job started by action=run needs a supervisor process beside it."""
        return self.max_restarts > 0 or self.hang_timeout_s is not None


@dataclass(slots=True)
class Watchdog:
    """Watches one launch between polls: a hang (no new iteration) or an unhealthy server."""

    policy: RestartPolicy
    health_urls: list[str] = field(default_factory=list)
    _since: float = field(default_factory=lambda: time.monotonic())
    _iteration: int | None = None
    _unhealthy: int = 0

    @classmethod
    def of(cls, policy: RestartPolicy, record: JobRecord) -> Watchdog:
        urls = [url.removesuffix("/v1") + "/health" for url in record.info.get("urls", {}).values()]
        return cls(policy, urls if policy.watch_health else [])

    def check(self, state: JobState, summary: MetricsSummary | None) -> str | None:
        """What is wrong with a running job now: 'hang' or 'unhealthy', else None."""
        now = time.monotonic()
        iteration = summary.iteration if summary is not None else None
        if iteration != self._iteration or state is JobState.PENDING:  # waiting in a queue is no hang
            self._iteration, self._since = iteration, now
        if state is not JobState.RUNNING or (summary is not None and summary.ended):
            return None
        timeout = self.policy.hang_timeout_s
        if timeout is not None and self._iteration is None:
            timeout *= STARTUP_ALLOWANCE
        if timeout is not None and now - self._since >= timeout:
            return "hang"
        if self.health_urls:
            self._unhealthy = 0 if all(answers(url, timeout=5) for url in self.health_urls) else self._unhealthy + 1
            if self._unhealthy >= UNHEALTHY_POLLS:
                return "unhealthy"
        return None

    @property
    def seconds_since_iteration(self) -> float:
        return time.monotonic() - self._since


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What to do after a failed launch, and why."""

    diagnosis: Diagnosis
    restart: bool
    reason: str
    """One line: 'restart 1 of 2 in 5s', or why not."""


class Supervision:
    """The restarts of one job, across its launches: its events file, its count, the hosts it lost."""

    def __init__(self, policy: RestartPolicy, detached: dict[str, Any] | None = None) -> None:
        self.policy = policy
        self.detached = detached
        """The supervisor process's identity ({pid, start, log}) when it runs apart from the user's terminal."""
        self.restarts = 0
        self.events: Path | None = None
        self.last: Diagnosis | None = None
        self.lost_hosts: list[str] = []
        self.watchdog: Watchdog | None = None
        self._forced: Diagnosis | None = None

    def launched(self, record: JobRecord) -> None:
        """Note a launch (the first one's log folder holds the events of all of them); each launch's job.json
        carries the supervisor, the restarts so far and the last diagnosis, for `query` and `stop`."""
        if self.events is None:
            self.events = Path(record.log_dir) / "events.jsonl"
        metrics = record.info.get("metrics_file")
        self._event("launched", record, restart=self.restarts, hosts=[h.host.name for h in record.hosts],
                    metrics=metrics, created=record.created_at)
        self.watchdog = Watchdog.of(self.policy, record)
        self._forced = None
        self._keep(record)

    def _keep(self, record: JobRecord) -> None:
        kept: dict[str, Any] = {"restarts": self.restarts, "events": str(self.events),
                                "lost_hosts": list(self.lost_hosts)}  # fmt: skip
        if self.last is not None:
            kept |= {"diagnosis": self.last.detail, "kind": self.last.kind.value}
        if self.detached is not None:
            kept |= self.detached
        record.info["supervisor"] = kept
        record.save()

    def intervene(self, launcher: Launcher, record: JobRecord, problem: str) -> list[str]:
        """A running job the watchdog found wrong: save its stacks (a hang), stop it, and remember why for
        `after_failure`. Returns lines to show (where the stacks are, what could not be saved)."""
        assert self.watchdog is not None
        shown: list[str] = []
        if problem == "hang":
            seconds = self.watchdog.seconds_since_iteration
            files, errors = launcher.stacks(record)
            if files:
                shown.append(f"saved the Python stacks of {len(files)} process(es) to "
                             f"{Path(files[0]).parent}/")
            shown += [f"stack dump: {e}" for e in errors]
            self._forced = diagnose([HostEvidence(host=h.host.name, hung=True, seconds_since_iteration=seconds)
                                     for h in record.hosts[:1]])
            self._event("hang", record, seconds=round(seconds, 1), stacks=files)
        else:
            urls = self.watchdog.health_urls
            self._forced = Diagnosis(Kind.HANG, record.hosts[0].host.name, None,
                                     f"the server stopped answering {urls[0]} ({UNHEALTHY_POLLS} checks in a row)")
            self._event("unhealthy", record, urls=urls)
        launcher.stop(record, record.settings.stop_timeout)
        record.stop_requested_at = None  # stopped by the supervisor, not the user: a failure to diagnose
        record.save()
        return shown

    def after_failure(self, record: JobRecord, status: JobStatus) -> Decision:
        """Diagnose a failed launch, record it, and decide whether to launch again."""
        diagnosis = self._forced or diagnose_job(record, status)
        if not diagnosis.restartable:
            restart, reason = False, f"not restarted: {diagnosis.kind.value} would fail the same way again"
        elif self.restarts >= self.policy.max_restarts:
            restart, reason = False, f"not restarted: {self.restarts} of max_restarts {self.policy.max_restarts} used"
        else:
            restart = True
            reason = f"restart {self.restarts + 1} of {self.policy.max_restarts} in {self.policy.backoff_s:g}s"
            if diagnosis.kind is Kind.HOST_LOST and diagnosis.host:
                self.lost_hosts.append(diagnosis.host)
                reason += (f", without host {diagnosis.host} (a spare host of the hostfile takes its place; on Slurm, "
                           "another node)")
        self.last = diagnosis
        self._keep(record)
        self._event("failed", record, kind=diagnosis.kind.value, detail=diagnosis.detail, restart=restart)
        if restart:
            self.restarts += 1
        return Decision(diagnosis=diagnosis, restart=restart, reason=reason)

    def gave_up(self, record: JobRecord, why: str) -> None:
        """A relaunch that could not start (no spare host left, a host that refuses): the supervision ends."""
        self._event("gave_up", record, reason=why)

    def ended(self, record: JobRecord, state: JobState) -> None:
        self._event("ended", record, state=state.value, restarts=self.restarts)

    def _event(self, event: str, record: JobRecord, **fields: object) -> None:
        if self.events is None:
            return
        line = {"event": event, "time": time.time(), "run_id": record.run_id, **fields}
        with self.events.open("a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")


def diagnose_job(record: JobRecord, status: JobStatus) -> Diagnosis:
    """The cause of a failed job, from every host's exit status and the end of its log."""
    return diagnose([_evidence(record, status, i) for i in range(len(record.hosts))])


def _evidence(record: JobRecord, status: JobStatus, index: int) -> HostEvidence:
    host_record, host_status = record.hosts[index], status.hosts[index]
    return HostEvidence(
        host=host_record.host.name,
        exit_code=host_status.exit_code,
        answered=host_status.error is None,
        user_stopped=record.stop_requested_at is not None,
        log=_read_tail(host_record.log_path),
    )


def _read_tail(path: str) -> str:
    """The end of a host's log where this machine can read it (shared file system or collected logs)."""
    try:
        with open(path, "rb") as log:
            log.seek(0, 2)
            log.seek(max(0, log.tell() - LOG_TAIL_BYTES))
            return log.read().decode(errors="replace")
    except OSError:
        return ""


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The supervisor's events of a job (events.jsonl), oldest first; [] if there are none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


@dataclass(frozen=True, slots=True)
class Goodput:
    """How much of a job's wall time went into iterations it kept."""

    kept_s: float
    wall_s: float
    redone: int
    """Iterations run more than once (lost to failures and redone after a restart)."""

    @property
    def ratio(self) -> float:
        return self.kept_s / self.wall_s if self.wall_s > 0 else 0.0


def goodput(events: list[dict[str, Any]], now: float | None = None) -> Goodput | None:
    """Goodput across every launch of a supervised job: for each iteration the step time of the launch that
    logged it last, over the wall time from the first launch to the end (or now). None without metrics."""
    launches = [e for e in events if e.get("event") == "launched" and e.get("metrics")]
    if not launches:
        return None
    kept: dict[int, float] = {}
    runs = 0
    for launch in launches:
        try:
            summary = parse_metrics(Path(launch["metrics"]).read_text(encoding="utf-8"))
        except OSError:
            continue
        for event in summary.events:
            if event.get("event") == "train" and "step_time_ms" in event:
                kept[event["iteration"]] = event["step_time_ms"] / 1000
                runs += 1
    if not kept:
        return None
    ends = [e["time"] for e in events if e.get("event") in ("ended", "gave_up")]
    end = ends[-1] if ends else (now or time.time())
    begin = launches[0].get("created", launches[0]["time"])
    return Goodput(kept_s=sum(kept.values()), wall_s=end - begin, redone=runs - len(kept))
