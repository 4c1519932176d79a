"""Reading the training program's metrics file (metrics.jsonl) and showing live progress until the job
ends, or until a host has not answered for too long (HostsUnreachable: following never loops for ever)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from flagscale.exceptions import LaunchError
from flagscale.spec.record import JobState


class HostsUnreachable(LaunchError):
    """Some hosts did not answer for `seconds`; `problems` has one line per host (its name and last error)."""

    def __init__(self, problems: list[str], seconds: float) -> None:
        self.problems, self.seconds = problems, seconds
        super().__init__(f"{len(problems)} host(s) did not answer for {seconds:.0f}s: " + "; ".join(problems))


@dataclass(slots=True)
class MetricsSummary:
    """The latest facts of a training run, as query and progress show them."""

    train_iters: int | None = None
    start_iteration: int = 0
    iteration: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    val_loss: float | None = None
    ended: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)


def parse_metrics(text: str) -> MetricsSummary:
    """Fold metrics.jsonl lines into a summary; a torn last line is ignored."""
    summary = MetricsSummary()
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        summary.events.append(event)
        kind = event.get("event")
        if kind == "start":
            summary.train_iters = event.get("train_iters", summary.train_iters)
            summary.start_iteration = event.get("start_iteration", 0)
        elif kind == "train":
            summary.iteration = event.get("iteration")
            summary.loss = event.get("loss")
            summary.tokens_per_s = event.get("tokens_per_s")
        elif kind == "valid":
            summary.val_loss = event.get("val_loss")
        elif kind == "end":
            summary.ended = True
    return summary


def read_metrics(text: str | None) -> MetricsSummary | None:
    return None if text is None else parse_metrics(text)


def describe(summary: MetricsSummary | None) -> str:
    if summary is None or summary.iteration is None:
        return "no iteration logged yet"
    total = f"/{summary.train_iters}" if summary.train_iters else ""
    parts = [f"iteration {summary.iteration}{total}", f"loss {summary.loss:.4f}"]
    if summary.val_loss is not None:
        parts.append(f"val loss {summary.val_loss:.4f}")
    if summary.tokens_per_s:
        parts.append(f"{summary.tokens_per_s:,.0f} tokens/s")
    return ", ".join(parts)


def follow_progress(console: Console, read: Callable[[], MetricsSummary | None],
                    poll: Callable[[], tuple[JobState, list[str]]], interval: float = 2.0,
                    give_up_s: float = 120.0) -> JobState:
    """Show progress from the metrics (`read`) until `poll` reports a terminal state. `poll` also names the hosts
    it could not reach; if some stay unreachable for `give_up_s`, raise HostsUnreachable."""
    seen = 0
    unreachable_since: float | None = None
    with _progress(console) as progress:
        task: TaskID | None = None
        while True:
            state, problems = poll()
            unreachable_since = (unreachable_since or time.monotonic()) if problems else None
            if unreachable_since is not None and time.monotonic() - unreachable_since >= give_up_s:
                raise HostsUnreachable(problems, give_up_s)
            summary = read()
            if summary is not None:
                if task is None and summary.train_iters:
                    task = progress.add_task("train", total=summary.train_iters, completed=summary.start_iteration,
                                             info="starting")
                seen = _report(console, progress, task, summary, seen)
            if state.is_terminal():
                return state
            time.sleep(interval)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=not console.is_terminal,
    )


def _report(console: Console, progress: Progress, task: TaskID | None, summary: MetricsSummary, seen: int) -> int:
    """Update the bar; without a terminal, print each new train/valid event as a line instead."""
    if task is not None and summary.iteration is not None:
        progress.update(task, completed=summary.iteration, info=describe(summary))
    if not console.is_terminal:
        for event in summary.events[seen:]:
            if event.get("event") == "train":
                console.print(f"iteration {event['iteration']}: loss {event['loss']:.4f}, "
                              f"{event.get('tokens_per_s', 0):,.0f} tokens/s")
            elif event.get("event") == "valid":
                console.print(f"iteration {event['iteration']}: validation loss {event['val_loss']:.4f}")
    return len(summary.events)
