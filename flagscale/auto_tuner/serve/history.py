"""A serving trial's outcome and its history.csv row (flagscale/auto_tuner/history.py keeps the file: appended and
flushed per trial, resumed from, refused when recorded for another deployment or load)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from flagscale.auto_tuner.history import RowCodec, TrialStatus, cell
from flagscale.auto_tuner.serve.config import METRICS
from flagscale.auto_tuner.serve.space import ServeCandidate

FIGURES = tuple(METRICS)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeResult:
    """One trial: a server started with the candidate's settings and measured under the load profile."""

    trial: int
    candidate: ServeCandidate
    status: TrialStatus
    figures: dict[str, float | None] = field(default_factory=dict)
    """The load generator's figures (flagscale/serve/loadgen.py), for an ok trial."""
    failed_requests: int = 0
    startup_s: float | None = None
    """From launch to the server answering its ready URLs."""
    elapsed_s: float = 0.0
    reason: str = ""
    exp_dir: str = ""
    fingerprint: str = ""

    def metric(self, name: str) -> float | None:
        """A figure of an ok trial (None otherwise)."""
        return self.figures.get(name) if self.status is TrialStatus.OK else None


COLUMNS = ("trial", "key", "engine", "settings", "status", *FIGURES, "failed_requests", "startup_s", "elapsed_s",
           "reason", "exp_dir", "fingerprint")


def to_row(r: ServeResult) -> dict[str, str]:
    values: dict[str, Any] = {"trial": r.trial, "key": r.candidate.key, "engine": r.candidate.engine,
                              "settings": json.dumps(r.candidate.settings), "status": r.status,
                              **{f: r.figures.get(f) for f in FIGURES}, "failed_requests": r.failed_requests,
                              "startup_s": r.startup_s, "elapsed_s": r.elapsed_s, "reason": r.reason,
                              "exp_dir": r.exp_dir, "fingerprint": r.fingerprint}
    return {k: cell(v) for k, v in values.items()}


def from_row(row: dict[str, str]) -> ServeResult:
    settings = tuple((str(k), v) for k, v in json.loads(row["settings"]))
    candidate = ServeCandidate(row["engine"], settings)
    if candidate.key != row["key"]:
        raise ValueError("key and settings disagree")
    return ServeResult(trial=int(row["trial"]), candidate=candidate, status=TrialStatus(row["status"]),
                       figures={f: _number(row[f]) for f in FIGURES}, failed_requests=int(row["failed_requests"] or 0),
                       startup_s=_number(row["startup_s"]), elapsed_s=float(row["elapsed_s"] or 0),
                       reason=row["reason"], exp_dir=row["exp_dir"], fingerprint=row["fingerprint"])


def _number(text: str) -> float | None:
    return float(text) if text else None


SERVE_ROWS = RowCodec(COLUMNS, to_row, from_row)
