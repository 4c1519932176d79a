"""What the tuner shows and leaves behind: the live trial table, summary.csv and its printed
table, trials.png (metric per trial; measured peak memory against the estimate) and best.yaml."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console
from rich.live import Live
from rich.table import Table

from flagscale.auto_tuner.history import TrialResult, TrialStatus

STATUS_STYLE = {TrialStatus.OK: "green", TrialStatus.OOM: "red", TrialStatus.FAILED: "red",
                TrialStatus.TIMEOUT: "yellow"}


def _fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def best_result(results: Iterable[TrialResult], metric: str, higher_is_better: bool) -> TrialResult | None:
    """The ok trial with the best metric (ties: the earlier trial)."""
    ok = [r for r in results if r.metric(metric) is not None]
    if not ok:
        return None
    sign = -1 if higher_is_better else 1
    return min(ok, key=lambda r: (sign * r.metric(metric), r.trial))


def trials_table(results: list[TrialResult], metric: str, title: str, running: str | None = None) -> Table:
    """One row per trial (and the running one), as the live view and the final summary show them."""
    table = Table(title=title, title_justify="left")
    for column in ("trial", "strategy", "status", "tokens/s", "ms/step", "peak MB", "est. MB", "time", "reason"):
        table.add_column(column, overflow="fold", no_wrap=column != "reason",
                         justify="left" if column in ("strategy", "status", "reason") else "right")
    for r in results:
        style = STATUS_STYLE[r.status]
        table.add_row(str(r.trial), r.candidate.describe(), f"[{style}]{r.status.value}[/]", _fmt(r.tokens_per_s, 0),
                      _fmt(r.step_time_ms), _fmt(r.peak_mem_mb, 0), _fmt(r.estimate_mb, 0),
                      f"{r.elapsed_s:.0f}s", r.reason[:80])
    if running:
        table.add_row("…", running, "[cyan]running[/]", "", "", "", "", "", "")
    return table


def wide(console: Console) -> Console:
    """The console itself on a terminal; elsewhere (logs, pipes) one wide enough for a table."""
    if console.is_terminal:
        return console
    return Console(file=console.file, highlight=False, width=max(console.width, 160))


@dataclass(slots=True)
class LiveView:
    """The live table on a terminal; one printed line per event elsewhere (CI logs, pipes). Used by the training
    and the serving tuner: `table` draws the results (and the running trial's label), `line` says how one ended."""

    console: Console
    header: str
    results: list[Any]
    table: Callable[[list[Any], str, str | None], Table]
    """(results, title, running label or None) -> the table."""
    line: Callable[[Any], str]
    """A finished trial's one-line summary (printed without a terminal)."""
    _live: Live | None = None
    _running: str | None = None
    _started: float = 0.0

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            self._live = Live(self._table(), console=self.console, refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._running = None
            self._live.update(self._table())
            self._live.__exit__(None, None, None)

    def _table(self) -> Table:
        return self.table(self.results[-20:], self.header, self._running)

    def start(self, trial: int, label: str, detail: str = "") -> None:
        """A trial begins: `label` in the table, `label (detail)` as a line."""
        self._started = time.time()
        self._running = f"{trial}: {label}"
        if self._live is None:
            self.console.print(f"trial {trial}: {label}" + (f" ({detail})" if detail else ""), markup=False)
        else:
            self._live.update(self._table())

    def poll(self, progress: str) -> None:
        """The running trial's progress."""
        if self._live is not None and self._running is not None:
            base = self._running.split(" — ")[0]
            self._running = f"{base} — {progress}, {time.time() - self._started:.0f}s"
            self._live.update(self._table())

    def finish(self, result: Any) -> None:
        """A trial ended (`results` already holds it)."""
        self._running = None
        if self._live is None:
            self.console.print(self.line(result), markup=False)
        else:
            self._live.update(self._table())


def trial_line(result: TrialResult) -> str:
    """A finished training trial in one line."""
    return (f"trial {result.trial}: {result.status.value}; {_fmt(result.tokens_per_s, 0)} tokens/s, "
            f"{_fmt(result.step_time_ms)} ms/step, peak {_fmt(result.peak_mem_mb, 0)} MB "
            f"(estimate {_fmt(result.estimate_mb, 0)} MB) {result.reason}").rstrip()


def training_view(console: Console, metric: str, header: str, results: list[TrialResult]) -> LiveView:
    """The training tuner's live view."""
    return LiveView(console, header, results, lambda rows, title, running: trials_table(rows, metric, title, running),
                    trial_line)


SUMMARY_COLUMNS = ("key", "strategy", "fate", "trial", "status", "tokens_per_s", "step_time_ms", "peak_mem_mb",
                   "estimate_mb", "predicted_step_ms", "reason")


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """summary.csv: every valid candidate with what became of it (trial result, pruning or early stop)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in SUMMARY_COLUMNS})


def plot_trials(path: Path, results: list[TrialResult], metric: str, higher_is_better: bool = True) -> bool:
    """trials.png: the metric per trial (best so far as a line) and measured peak memory vs the estimate."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    ok = [r for r in results if r.metric(metric) is not None]
    bad = [r for r in results if r.metric(metric) is None]
    left.plot([r.trial for r in ok], [r.metric(metric) for r in ok], "o", color="tab:green", label="ok")
    if ok:
        pick = max if higher_is_better else min
        best = [pick(r.metric(metric) for r in ok if r.trial <= t.trial) for t in ok]
        left.step([r.trial for r in ok], best, where="post", color="gray", alpha=0.6, label="best so far")
    low = min((r.metric(metric) for r in ok), default=0.0)
    left.plot([r.trial for r in bad], [low] * len(bad), "x", color="tab:red", label="oom/failed/timeout")
    left.set(xlabel="trial", ylabel=metric, title="metric per trial")
    left.grid(alpha=0.3)
    left.legend()
    pairs = [(r.estimate_mb, r.peak_mem_mb) for r in results if r.estimate_mb and r.peak_mem_mb]
    if pairs:
        right.plot([p[0] for p in pairs], [p[1] for p in pairs], "o", color="tab:blue", label="trials")
        low, top = min(min(p) for p in pairs), max(max(p) for p in pairs)
        right.plot([low, top], [low, top], "--", color="gray", label="measured = estimate")
        right.legend()
    right.set(xlabel="estimated MB (reporting rank)", ylabel="measured peak MB", title="memory: measured vs estimate")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_best(path: Path, raw: dict[str, Any], comment: list[str]) -> None:
    """best.yaml: a complete config (no defaults list needed), runnable with run.py as it is."""
    body = OmegaConf.to_yaml(OmegaConf.create(raw))
    path.write_text("".join(f"# {line}\n" for line in comment) + body, encoding="utf-8")
