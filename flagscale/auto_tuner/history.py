"""`<exp_dir>/auto_tuner/history.csv`: one row per finished trial (strategy, status, metrics,
peak memory, estimate, reason). Rows are appended and flushed as trials end, so an interrupted
search resumes from the file without re-running anything it holds. Each row carries the
fingerprint of what was tuned (the training config minus the searched dimensions); a history
recorded for a different job is refused rather than silently mixed in. The serving tuner keeps its
own columns in the same kind of file (`RowCodec`; flagscale/auto_tuner/serve/history.py)."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from flagscale.auto_tuner.space import Candidate
from flagscale.exceptions import ConfigError


class TrialStatus(str, Enum):
    """How a trial ended."""

    OK = "ok"
    OOM = "oom"
    FAILED = "failed"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True, kw_only=True)
class TrialResult:
    """One trial's outcome."""

    trial: int
    candidate: Candidate
    status: TrialStatus
    tokens_per_s: float | None = None
    """Median over the measured iterations."""
    step_time_ms: float | None = None
    """Median over the measured iterations."""
    peak_mem_mb: float | None = None
    """Peak memory the training program reported (CUDA allocated on GPU, resident set on CPU)."""
    estimate_mb: float | None = None
    """The memory model's estimate for the process that reported peak_mem_mb."""
    measured_iterations: int = 0
    elapsed_s: float = 0.0
    reason: str = ""
    exp_dir: str = ""
    fingerprint: str = ""

    def metric(self, name: str) -> float | None:
        """The value of a performance metric (None unless the trial is ok)."""
        return getattr(self, name) if self.status is TrialStatus.OK else None


CANDIDATE_COLUMNS = ("dp", "tp", "pp", "cp", "ep", "sp", "vpp_layers", "mbs", "recompute", "recompute_method",
                     "recompute_layers", "dist_opt")
RESULT_COLUMNS = ("status", "tokens_per_s", "step_time_ms", "peak_mem_mb", "estimate_mb", "measured_iterations",
                  "elapsed_s", "reason", "exp_dir", "fingerprint")
COLUMNS = ("trial", "key", *CANDIDATE_COLUMNS, *RESULT_COLUMNS)
_INT = {"dp", "tp", "pp", "cp", "ep", "mbs", "vpp_layers", "recompute_layers", "trial", "measured_iterations"}
_FLOAT = {"tokens_per_s", "step_time_ms", "peak_mem_mb", "estimate_mb", "elapsed_s"}
_BOOL = {"sp", "dist_opt"}


def fingerprint(data: Any) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _parse(name: str, text: str) -> Any:
    if text == "":
        return None if name not in ("reason", "exp_dir", "fingerprint") else ""
    if name in _INT:
        return int(text)
    if name in _FLOAT:
        return float(text)
    if name in _BOOL:
        return text == "true"
    return text


def to_row(result: TrialResult) -> dict[str, str]:
    """A result as a CSV row."""
    c = result.candidate
    values = {"trial": result.trial, "key": c.key, **{n: getattr(c, n) for n in CANDIDATE_COLUMNS},
              **{n: getattr(result, n) for n in RESULT_COLUMNS}}
    return {name: cell(value) for name, value in values.items()}


def from_row(row: dict[str, str]) -> TrialResult:
    """A CSV row as a result (ValueError/KeyError for a torn or foreign row)."""
    values = {name: _parse(name, row[name]) for name in COLUMNS}
    candidate = Candidate(**{n: values[n] for n in CANDIDATE_COLUMNS})
    fields = {n: values[n] for n in RESULT_COLUMNS}
    fields["status"] = TrialStatus(fields["status"])
    fields["measured_iterations"] = fields["measured_iterations"] or 0
    fields["elapsed_s"] = fields["elapsed_s"] or 0.0
    return TrialResult(trial=values["trial"], candidate=candidate, **fields)


@dataclass(frozen=True, slots=True)
class RowCodec:
    """How one kind of result is a CSV row (its results have .trial, .candidate.key and .fingerprint)."""

    columns: tuple[str, ...]
    to_row: Callable[[Any], dict[str, str]]
    from_row: Callable[[dict[str, str]], Any]
    """Raises ValueError/KeyError/TypeError for a torn or foreign row."""


TRAINING_ROWS = RowCodec(COLUMNS, to_row, from_row)


class History:
    """The trials of one search, backed by history.csv."""

    def __init__(self, path: Path, job_fingerprint: str, rows: RowCodec = TRAINING_ROWS,
                 what: str = "training config or trial length") -> None:
        self.path = path
        self.job_fingerprint = job_fingerprint
        self.rows = rows
        self.what = what
        self.results: list[Any] = self._load()

    def _load(self) -> list[Any]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        results = []
        for row in rows:
            try:
                results.append(self.rows.from_row(row))
            except (KeyError, ValueError, TypeError):
                continue  # a row torn by an interruption: that trial runs again
        foreign = {r.fingerprint for r in results} - {self.job_fingerprint}
        if foreign:
            raise ConfigError(f"{self.path} was recorded for a different {self.what}; "
                              f"use another experiment.exp_dir, or delete {self.path.parent} to start over")
        return results

    def by_key(self) -> dict[str, Any]:
        """The latest result per candidate key."""
        return {r.candidate.key: r for r in self.results}

    @property
    def next_trial(self) -> int:
        """The next trial number (1-based; trial directories already on disk are never reused)."""
        used = [r.trial for r in self.results]
        used += [int(p.name.split("_")[1]) for p in self.path.parent.glob("trial_*") if p.name.split("_")[1].isdigit()]
        return max(used, default=0) + 1

    def append(self, result: Any) -> None:
        """Record a finished trial (header written on first use; flushed at once)."""
        self.results.append(result)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        torn = not new and not self.path.read_bytes().endswith(b"\n")
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.rows.columns)
            if new:
                writer.writeheader()
            if torn:  # end an interrupted last line so it stays one (skipped) row
                handle.write("\r\n")
            writer.writerow(self.rows.to_row(result))
