"""Restarting a failed training job: the policy from experiment.runner, and the decision after each failure.

After a launch ends FAILED, `after_failure` diagnoses the cause from every host's exit status and log
(flagscale/supervisor/diagnosis.py), appends it to `<exp_dir>/logs/<first run id>/events.jsonl`, keeps the
restart count and the last diagnosis in job.json (`info.supervisor`), and says whether to launch again: only
while restarts are left and the cause is one a restart can cure (a killed or crashed rank, a communication
error, a lost host, a hang — not a configuration or data error that would fail the same way). The training
program resumes from the latest checkpoint with the data position, so a restart redoes at most one save
interval.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from flagscale.config.schema import RunnerConfig
from flagscale.jobs import JobStatus
from flagscale.spec.record import JobRecord
from flagscale.supervisor.diagnosis import Diagnosis, HostEvidence, diagnose

LOG_TAIL_BYTES = 64_000


@dataclass(frozen=True, slots=True, kw_only=True)
class RestartPolicy:
    """experiment.runner.max_restarts / restart_backoff."""

    max_restarts: int = 0
    backoff_s: float = 10.0

    @classmethod
    def of(cls, runner: RunnerConfig) -> RestartPolicy:
        return cls(max_restarts=runner.max_restarts, backoff_s=runner.restart_backoff)


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What to do after a failed launch, and why."""

    diagnosis: Diagnosis
    restart: bool
    reason: str
    """One line: 'restart 1 of 2 in 5s', or why not."""


class Supervision:
    """The restarts of one foreground job: its events file and its count."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.restarts = 0
        self.events: Path | None = None
        self.last: Diagnosis | None = None

    def launched(self, record: JobRecord) -> None:
        """Note a launch (the first one's log folder holds the events of all of them); a relaunch's job.json
        carries the restarts so far and the last diagnosis, for `query`."""
        if self.events is None:
            self.events = Path(record.log_dir) / "events.jsonl"
        self._event("launched", record, restart=self.restarts)
        if self.last is not None:
            self._keep(record)

    def _keep(self, record: JobRecord) -> None:
        assert self.last is not None
        record.info["supervisor"] = {"restarts": self.restarts, "diagnosis": self.last.detail,
                                     "kind": self.last.kind.value, "events": str(self.events)}  # fmt: skip
        record.save()

    def after_failure(self, record: JobRecord, status: JobStatus) -> Decision:
        """Diagnose a FAILED launch, record it, and decide whether to launch again."""
        diagnosis = diagnose_job(record, status)
        if not diagnosis.restartable:
            restart, reason = False, f"not restarted: {diagnosis.kind.value} would fail the same way again"
        elif self.restarts >= self.policy.max_restarts:
            restart, reason = False, f"not restarted: {self.restarts} of max_restarts {self.policy.max_restarts} used"
        else:
            restart = True
            reason = f"restart {self.restarts + 1} of {self.policy.max_restarts} in {self.policy.backoff_s:g}s"
        self.last = diagnosis
        self._keep(record)
        self._event("failed", record, kind=diagnosis.kind.value, detail=diagnosis.detail, restart=restart)
        if restart:
            self.restarts += 1
        return Decision(diagnosis=diagnosis, restart=restart, reason=reason)

    def ended(self, record: JobRecord, status: JobStatus) -> None:
        self._event("ended", record, state=status.state.value, restarts=self.restarts)

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
