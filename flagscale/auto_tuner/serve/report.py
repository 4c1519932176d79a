"""What the serving tuner shows and leaves: the live/final trial table, summary.csv (every candidate and what
became of it), tradeoff.png (the metric against the first SLO figure, with the bound, per engine)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from rich.table import Table

from flagscale.auto_tuner.report import STATUS_STYLE
from flagscale.auto_tuner.serve.history import ServeResult
from flagscale.auto_tuner.serve.search import Objective

SUMMARY_COLUMNS = ("key", "engine", "settings", "fate", "trial", "status", "meets_slo", "metric", "ttft_p95_ms",
                   "itl_p50_ms", "output_tokens_per_s", "reason")
ENGINE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def slo_text(objective: Objective, r: ServeResult) -> str:
    """'yes', or the bounds the trial missed."""
    if r.metric(objective.metric) is None:
        return ""
    missed = objective.violations(r)
    if r.failed_requests:
        return "no: requests failed"
    if not missed:
        return "[green]yes[/]" if objective.slo else "n/a"
    return "[red]no[/]: " + ", ".join(f"{name} {_fmt(r.metric(name), 2)}" for name in missed)


def serve_table(results: list[ServeResult], objective: Objective, title: str, running: str | None = None) -> Table:
    """One row per trial (and the running one)."""
    table = Table(title=title, title_justify="left")
    for column in ("trial", "engine / settings", "status", "TTFT p50", "TTFT p95", "ITL p50", "tokens/s", "req/s",
                   "SLO", "start s", "reason"):
        table.add_column(column, overflow="fold", no_wrap=column not in ("reason", "SLO"),
                         justify="left" if column in ("engine / settings", "status", "SLO", "reason") else "right")
    for r in results:
        f = r.figures if r.metric(objective.metric) is not None else {}
        table.add_row(str(r.trial), r.candidate.describe(), f"[{STATUS_STYLE[r.status]}]{r.status.value}[/]",
                      _fmt(f.get("ttft_p50_ms"), 2), _fmt(f.get("ttft_p95_ms"), 2), _fmt(f.get("itl_p50_ms"), 2),
                      _fmt(f.get("output_tokens_per_s"), 0), _fmt(f.get("requests_per_s"), 1), slo_text(objective, r),
                      _fmt(r.startup_s), r.reason[:90])
    if running:
        table.add_row("…", running, "[cyan]running[/]", *[""] * 8)
    return table


def serve_line(objective: Objective, r: ServeResult) -> str:
    """A finished trial in one line (logs without a terminal)."""
    if r.metric(objective.metric) is None:
        return f"trial {r.trial}: {r.status.value}; {r.reason}"
    f = r.figures
    slo = slo_text(objective, r).replace("[green]", "").replace("[red]", "").replace("[/]", "")
    return (f"trial {r.trial}: ok; {_fmt(f.get('output_tokens_per_s'), 0)} tokens/s, TTFT p50/p95 "
            f"{_fmt(f.get('ttft_p50_ms'), 2)}/{_fmt(f.get('ttft_p95_ms'), 2)} ms, ITL p50 "
            f"{_fmt(f.get('itl_p50_ms'), 2)} ms, {objective.metric} {_fmt(r.metric(objective.metric), 2)}, "
            f"SLO {slo}, start-up {_fmt(r.startup_s)} s")


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in SUMMARY_COLUMNS})


def plot_tradeoff(path: Path, results: list[ServeResult], objective: Objective, best: ServeResult | None) -> bool:
    """tradeoff.png: left, the metric against the first SLO figure (else TTFT p95) per engine, the bound as a line,
    open markers for trials that miss the SLO, a star on the best; right, the metric per trial."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x_name = next(iter(objective.slo), "ttft_p95_ms")
    ok = [r for r in results if r.metric(objective.metric) is not None and r.metric(x_name) is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    engines = list(dict.fromkeys(r.candidate.engine for r in results))
    for i, engine in enumerate(engines):
        color = ENGINE_COLORS[i % len(ENGINE_COLORS)]
        for meets in (True, False):
            rows = [r for r in ok if r.candidate.engine == engine and objective.feasible(r) == meets]
            if rows:
                left.scatter([r.metric(x_name) for r in rows], [r.metric(objective.metric) for r in rows],
                             facecolors=color if meets else "none", edgecolors=color,
                             label=f"{engine}" + ("" if meets else " (misses SLO)"))
        mine = [r for r in ok if r.candidate.engine == engine]
        right.plot([r.trial for r in mine], [r.metric(objective.metric) for r in mine], "o", color=color, label=engine)
    if x_name in objective.slo:
        bound = objective.slo[x_name]
        left.axvline(bound, color="red", linestyle="--", label=f"SLO {x_name} {bound:g}")
    if best is not None and best in ok:
        left.scatter([best.metric(x_name)], [best.metric(objective.metric)], marker="*", s=250, color="gold",
                     edgecolors="black", zorder=5, label=f"best (trial {best.trial})")
    left.set(xlabel=x_name, ylabel=objective.metric, title=f"{objective.metric} vs {x_name}")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.set(xlabel="trial", ylabel=objective.metric, title="metric per trial")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.grid(alpha=0.3)
    if ok:
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
