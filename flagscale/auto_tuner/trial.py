"""One trial: the user's job with a candidate's train.* values, run through the same runner and
launcher as any job (`jobs.launch`), watched with `Launcher.status`, stopped with
`jobs.stop` when it runs out of time, and judged from its metrics.jsonl.

A trial is the user's run cut short: `control.iterations` iterations, one log line per iteration,
one validation batch at the end, no checkpoints saved or loaded, and the learning-rate schedule of
the full run (lr_decay_iters pinned), so a trial measures exactly what the real run would do first.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flagscale import jobs
from flagscale.auto_tuner.config import ControlConfig
from flagscale.auto_tuner.history import TrialResult, TrialStatus
from flagscale.auto_tuner.space import Candidate
from flagscale.config.flatten import flatten_leaves
from flagscale.config.loader import ConfigSource, JobConfig
from flagscale.exceptions import FlagScaleError
from flagscale.launcher.launcher import Launcher
from flagscale.runner.metrics import parse_metrics
from flagscale.spec.record import HostRecord, JobRecord, JobState

# What every trial sets, whatever the user's config says (None: the flag is left out).
TRIAL_FIXED: dict[str, Any] = {
    "train_samples": None, "log_interval": 1, "eval_iters": 1, "save": None, "load": None,
    "save_interval": None, "exit_interval": None, "exit_duration_in_mins": None, "tensorboard_dir": None,
    "lr_decay_samples": None,
}
OOM_PATTERNS = re.compile(
    r"out of memory|OutOfMemoryError|can't allocate memory|Cannot allocate memory|\bMemoryError\b|std::bad_alloc"
    r"|Signal 9 \(SIGKILL\)|exitcode\s*:\s*-9\b",
    re.IGNORECASE,
)
_ERROR_LINE = re.compile(r"^error: |^[\w.]*(Error|Exception): \S")  # the program's own / a Python exception
_NOISE = re.compile(r"ChildFailedError|[Ww]arning|elastic")  # torchrun's wrapper, not the cause
_RANK_PREFIX = re.compile(r"^(\[[^\]]*\]:)+\s*")


def set_leaf(task: dict[str, Any], key: str, value: Any) -> None:
    """Set train argument `key` where the config already has it, else in its `system` group (or at the top)."""
    leaves = flatten_leaves(task, "train")
    if key in leaves:
        node = task
        *groups, leaf = leaves[key][0].split(".")[1:]
        for group in groups:
            node = node[group]
        node[leaf] = value
    elif value is not None and value is not False:
        target = task["system"] if isinstance(task.get("system"), dict) else task
        target[key] = value


def trial_task(task: dict[str, Any], candidate: Candidate, control: ControlConfig, lr_decay_iters: int,
               with_experts: bool) -> dict[str, Any]:
    """The train section of a trial: the user's, with the candidate's values and a short schedule."""
    task = copy.deepcopy(task)
    values = {**TRIAL_FIXED, **candidate.train_values(with_experts), "train_iters": control.iterations,
              "eval_interval": control.iterations, "lr_decay_iters": lr_decay_iters}
    for key, value in values.items():
        set_leaf(task, key, value)
    return task


def job_with(base: JobConfig, task: dict[str, Any], exp_dir: Path | str, exp_name: str, action: str) -> JobConfig:
    """A JobConfig like `base` with another train section, exp_dir, name and action (no auto_tuner block)."""
    raw = copy.deepcopy(base.raw)
    raw["experiment"] = {**raw["experiment"], "exp_dir": str(exp_dir), "exp_name": exp_name}
    raw["experiment"].pop("auto_tuner", None)
    raw["train"], raw["action"] = task, action
    experiment = dataclasses.replace(base.experiment, exp_dir=str(exp_dir), exp_name=exp_name, auto_tuner=None)
    return JobConfig(action=action, experiment=experiment, task=task, source=ConfigSource(), raw=raw,
                     referenced=base.referenced)


@dataclass(slots=True, kw_only=True)
class TrialRun:
    """A trial about to run."""

    trial: int
    candidate: Candidate
    job: JobConfig
    estimate_mb: float | None
    fingerprint: str

    @property
    def exp_dir(self) -> Path:
        """The trial's experiment directory (its job record and logs)."""
        return self.job.exp_dir


def run_trial(run: TrialRun, control: ControlConfig, time_limit_s: float,
              on_poll: Callable[[str], None] = lambda _: None) -> TrialResult:
    """Launch, watch until the end or the time limit, and judge the trial. Ctrl-C stops it and re-raises."""
    began = time.time()
    try:
        record = jobs.launch(run.job)
    except FlagScaleError as err:
        return _result(run, began, status=TrialStatus.FAILED, reason=f"launch failed: {_first_line(str(err))}")
    except KeyboardInterrupt:
        if (run.exp_dir / "job.json").is_file():
            jobs.stop(run.exp_dir)
        raise
    with Launcher.from_settings(record.settings) as launcher:
        try:
            state, timed_out = _watch(launcher, record, began, time_limit_s, control.poll_interval_s, on_poll)
        except KeyboardInterrupt:
            jobs.stop(run.exp_dir)
            raise
        return _judge(run, launcher, record, began, state, timed_out, control)


def _watch(launcher: Launcher, record: JobRecord, began: float, limit_s: float, poll_s: float,
           on_poll: Callable[[str], None]) -> tuple[JobState, bool]:
    while True:
        state = launcher.job_state(record)
        if state.is_terminal():
            return state, False
        if time.time() - began > limit_s:
            jobs.stop(record.exp_dir)
            return state, True
        events = _train_events(launcher, record)
        on_poll(f"iteration {events[-1]['iteration']}" if events else "starting")
        time.sleep(poll_s)


def _judge(run: TrialRun, launcher: Launcher, record: JobRecord, began: float, state: JobState, timed_out: bool,
           control: ControlConfig) -> TrialResult:
    events = _train_events(launcher, record)
    figures = summarize(events, control.warmup_iterations)
    if timed_out:
        return _result(run, began, TrialStatus.TIMEOUT, reason=f"still running after {time.time() - began:.0f}s; "
                       "stopped (raise control.trial_timeout_s if that is too short)", **figures)
    if state is JobState.COMPLETED and figures["measured_iterations"]:
        return _result(run, began, TrialStatus.OK, **figures)
    if state is JobState.COMPLETED:
        return _result(run, began, TrialStatus.FAILED, reason="completed without train events after warm-up in "
                       "metrics.jsonl", **figures)
    log = "\n".join(_read(launcher, h, h.log_path, tail=True) for h in record.hosts)
    status, reason = classify_failure(log)
    return _result(run, began, status, reason=f"{state.value.lower()}: {reason}", **figures)


def _result(run: TrialRun, began: float, status: TrialStatus, **fields: Any) -> TrialResult:
    return TrialResult(trial=run.trial, candidate=run.candidate, status=status, estimate_mb=run.estimate_mb,
                       elapsed_s=time.time() - began, exp_dir=str(run.exp_dir), fingerprint=run.fingerprint, **fields)


def summarize(events: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Medians of tokens/s and step time over the iterations after warm-up; the peak memory seen."""
    measured = [e for e in events if e.get("iteration", 0) > warmup and e.get("step_time_ms")]
    peaks = [e["peak_mem_mb"] for e in events if e.get("peak_mem_mb") is not None]
    return {
        "tokens_per_s": statistics.median(e["tokens_per_s"] for e in measured) if measured else None,
        "step_time_ms": statistics.median(e["step_time_ms"] for e in measured) if measured else None,
        "peak_mem_mb": max(peaks) if peaks else None,
        "measured_iterations": len(measured),
    }


def classify_failure(log: str) -> tuple[TrialStatus, str]:
    """OOM when the log shows the device (or host) ran out of memory, else FAILED; with the first error line
    (the root cause comes before torchrun's summary)."""
    lines = [_RANK_PREFIX.sub("", line).strip() for line in log.splitlines()]
    lines = [line for line in lines if line]
    oom = [line for line in lines if OOM_PATTERNS.search(line)]
    if oom:
        return TrialStatus.OOM, _first_line(oom[0])
    errors = [line for line in lines if _ERROR_LINE.search(line) and not _NOISE.search(line)]
    return TrialStatus.FAILED, _first_line(errors[0] if errors else (lines[-1] if lines else "no log output"))


def _first_line(text: str, limit: int = 240) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _train_events(launcher: Launcher, record: JobRecord) -> list[dict[str, Any]]:
    path = record.info.get("metrics_file")
    if not path:
        return []
    text = next((t for h in reversed(record.hosts) if (t := _read(launcher, h, path))), "")
    return [e for e in parse_metrics(text).events if e.get("event") == "train"]


def _read(launcher: Launcher, host_record: HostRecord, path: str, tail: bool = False) -> str:
    """A job file here (shared file system) or on the host that wrote it; '' if neither has it."""
    local = Path(path)
    if local.is_file():
        text = local.read_text(errors="replace")
        return text[-20000:] if tail else text
    if host_record.host.is_local:
        return ""
    argv = ["tail", "-c", "20000", path] if tail else ["cat", path]
    try:
        result = launcher.transport(host_record.host).run(argv, timeout=30)
    except FlagScaleError:
        return ""
    return result.stdout if result.returncode == 0 else ""
