"""action=auto_tune: generate candidates, drop the invalid ones (rules.py) and those the memory
model rules out (memory.py), run the most promising as real trials (search.py, trial.py) until
the search stops, then write best.yaml, summary.csv, trials.png and print the follow-up commands.
Everything lives under `<exp_dir>/auto_tuner/`; a second invocation resumes from history.csv."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from flagscale import jobs
from flagscale.auto_tuner import rules
from flagscale.auto_tuner.config import AutoTunerConfig, load_tuner_config
from flagscale.auto_tuner.cost import PROFILES, Predictor
from flagscale.auto_tuner.history import History, TrialResult, fingerprint
from flagscale.auto_tuner.memory import MemoryEstimate, estimate
from flagscale.auto_tuner.report import (
    best_result,
    plot_trials,
    training_view,
    trials_table,
    wide,
    write_best,
    write_summary,
)
from flagscale.auto_tuner.search import Search
from flagscale.auto_tuner.space import Candidate, current_values, generate
from flagscale.auto_tuner.trial import TrialRun, job_with, run_trial, set_leaf, trial_task
from flagscale.auto_tuner.workload import Workload, parse_train_args, program_problems, workload_from_task
from flagscale.config.hostfile import Host
from flagscale.config.loader import JobConfig, select_hosts
from flagscale.exceptions import ConfigError, FlagScaleError
from flagscale.launcher.launcher import Launcher
from flagscale.runner.base import PlanContext
from flagscale.spec.record import JobState, load_record

console = Console(highlight=False, soft_wrap=True)
RunJob = Callable[[JobConfig], int]


def world_size(job: JobConfig, hosts: list[Host]) -> int:
    """Processes of the job, counted exactly as the train runner counts them."""
    ctx = PlanContext(job=job, hosts=hosts, run_id="auto-tune", master_port=None)
    return sum(ctx.nproc(h) for h in hosts)


def cost_profile(name: str, hosts: list[Host], work: Workload) -> str:
    """`auto`: gpu when the config or the hosts say so (device, host type, nvidia-smi here), else cpu."""
    if name != "auto":
        return name
    if work.device in ("cpu", "cuda"):
        return "gpu" if work.device == "cuda" else "cpu"
    if any(h.type for h in hosts) or shutil.which("nvidia-smi"):
        return "gpu"
    return "cpu"


@dataclass(slots=True, kw_only=True)
class Plan:
    """The candidates and what was decided about each before any trial."""

    candidates: list[Candidate]
    """Valid and within the memory budget: the search runs among these."""
    estimates: dict[str, MemoryEstimate]
    invalid: dict[str, list[str]] = field(default_factory=dict)
    memory_pruned: dict[str, str] = field(default_factory=dict)
    all_valid: list[Candidate] = field(default_factory=list)


class Tuner:
    """One auto-tuning session over the job `base`."""

    def __init__(self, base: JobConfig, run_job: RunJob | None = None) -> None:
        if base.experiment.task.type != "train":
            raise ConfigError(f"action=auto_tune tunes training jobs; experiment.task.type is "
                              f"{base.experiment.task.type}")
        self.base = base
        self.run_job = run_job
        """How `control.run_best` starts the best configuration (run.py's `run`, which prints how to follow it)."""
        self.config: AutoTunerConfig = load_tuner_config(base.experiment.auto_tuner)
        self.hosts = select_hosts(base)
        self.world = world_size(base, self.hosts)
        memory = self.config.memory_model
        self.work = workload_from_task(base.task, self.world, memory.vocab_size if memory else None)
        self.args = parse_train_args(base.task, self.world)
        self.dir = base.exp_dir / "auto_tuner"
        self.fingerprint = self._fingerprint()

    @property
    def metric(self) -> str:
        return self.config.performance.metric

    def _fingerprint(self) -> str:
        reference = Candidate(dp=1, tp=1, pp=1, mbs=1)
        task = trial_task(self.base.task, reference, self.config.control, self.args.lr_decay_iters, True)
        for key in reference.train_values(True):
            set_leaf(task, key, None)
        return fingerprint({"task": task, "world": self.world, "iterations": self.config.control.iterations,
                            "warmup": self.config.control.warmup_iterations})

    def plan(self) -> Plan:
        """Every candidate of the space: invalid by the rules (with reasons), over the memory budget, or to
        search. The training program's own argument check runs later, on each candidate about to be tried."""
        memory = self.config.memory_model
        baseline = memory.baseline_mb if memory else 0.0
        plan = Plan(candidates=[], estimates={})
        for c in generate(self.config.space, self.work, current_values(self.args)):
            problems = rules.check(c, self.work)
            if problems:
                plan.invalid[c.key] = problems
                continue
            plan.all_valid.append(c)
            plan.estimates[c.key] = estimate(c, self.work, baseline)
            fate = self._memory_fate(plan.estimates[c.key].peak_mb)
            if fate:
                plan.memory_pruned[c.key] = fate
            else:
                plan.candidates.append(c)
        return plan

    def _memory_fate(self, peak: float) -> str | None:
        """Why a candidate with this memory estimate never runs (None: it may)."""
        memory = self.config.memory_model
        if memory is None:
            return None
        low, high = memory.bounds_mb()
        share = "" if memory.utilization[1] == 1 else f"{memory.utilization[1]:g} × "
        if peak > high:
            return f"pruned: memory estimate {peak:,.1f} MB > {share}device_memory_mb {memory.device_memory_mb:,.1f} MB"
        if peak < low:
            return (f"pruned: memory estimate {peak:,.1f} MB < {memory.utilization[0]:g} × device_memory_mb "
                    f"{memory.device_memory_mb:,.1f} MB (utilization min)")
        return None

    def _program_problems(self, c: Candidate) -> list[str]:
        """What the training program's own argument check says about the trial config."""
        return [f"arguments: {p}" for p in program_problems(self._task(c), self.world)]

    def _task(self, c: Candidate) -> dict[str, Any]:
        with_experts = bool(self.work.num_experts)
        return trial_task(self.base.task, c, self.config.control, self.args.lr_decay_iters, with_experts)

    def trial_run(self, trial: int, c: Candidate, plan: Plan) -> TrialRun:
        """The trial's JobConfig: the user's job with c's values, in auto_tuner/trial_<i>."""
        name = f"{self.base.experiment.exp_name}-trial{trial}"
        job = job_with(self.base, self._task(c), self.dir / f"trial_{trial}", name, "run")
        return TrialRun(trial=trial, candidate=c, job=job, estimate_mb=plan.estimates[c.key].stage_mb(-1),
                        fingerprint=self.fingerprint)

    def run(self) -> int:
        """The whole session; returns the exit code."""
        self.dir.mkdir(parents=True, exist_ok=True)
        history = History(self.dir / "history.csv", self.fingerprint)
        stop_orphan_trials(self.dir, history)
        plan = self.plan()
        self._print_plan(plan, history)
        if not plan.candidates:
            raise ConfigError("no candidate is left to try (all invalid or outside the memory budget); "
                              "widen experiment.auto_tuner.space or adjust memory_model.device_memory_mb/utilization")
        profile = PROFILES[cost_profile(self.config.performance.cost_model, self.hosts, self.work)]
        search = Search(plan.candidates, Predictor(self.work, profile), self.config.control.stop_margin)
        try:
            reason = self._loop(plan, history, search)
        except KeyboardInterrupt:
            self._finish(plan, history, search, "interrupted (Ctrl-C); run the same command again to resume")
            return 130
        return self._finish(plan, history, search, reason)

    def _loop(self, plan: Plan, history: History, search: Search) -> str:
        control, began = self.config.control, time.time()
        in_space = {c.key for c in plan.candidates}
        with training_view(console, self.metric, "auto-tune trials", history.results) as view:
            while True:
                results = {k: r for k, r in history.by_key().items() if k in in_space}
                if control.max_trials is not None and len(history.results) >= control.max_trials:
                    return f"max_trials ({control.max_trials}) reached"
                left_s = None if control.max_time_s is None else control.max_time_s - (time.time() - began)
                if left_s is not None and left_s <= 0:
                    return f"max_time_s ({control.max_time_s:.0f}s) reached"
                step = search.next(results)
                if step.candidate is None:
                    return step.stop_reason
                problems = self._program_problems(step.candidate)  # checked only now: ~30 ms a candidate
                if problems:
                    search.drop(step.candidate, f"invalid: {problems[0]}")
                    continue
                run = self.trial_run(history.next_trial, step.candidate, plan)
                view.start(run.trial, run.candidate.describe(), f"estimate {run.estimate_mb or 0:,.0f} MB, predicted "
                           f"{search.predicted_ms(run.candidate):.1f} ms/step")
                limit = min(control.trial_timeout_s, left_s) if left_s is not None else control.trial_timeout_s
                history.append(run_trial(run, control, limit, view.poll))
                view.finish(history.results[-1])

    def _print_plan(self, plan: Plan, history: History) -> None:
        reasons = Counter(re.sub(r"\d+", "N", problems[0])[:90] for problems in plan.invalid.values())
        console.print(f"[bold]auto-tune[/] {self.base.experiment.exp_name}: world size {self.world}, "
                      f"{len(plan.all_valid) + len(plan.invalid)} candidates, {len(plan.invalid)} invalid, "
                      f"{len(plan.memory_pruned)} over the memory budget, {len(plan.candidates)} to search"
                      + (f"; resuming after {len(history.results)} recorded trial(s)" if history.results else ""))
        for reason, count in reasons.most_common(6):
            console.print(f"  invalid ×{count}: {reason}", markup=False)
        for note in self.config.notes:
            console.print(f"  note: {note}", markup=False)
        console.print(f"  history: {history.path}")

    def _finish(self, plan: Plan, history: History, search: Search, reason: str) -> int:
        """Reports, best.yaml and the follow-up commands; run_best launches it."""
        in_space = {c.key for c in plan.all_valid}
        results = [r for r in history.results if r.candidate.key in in_space]
        console.print(f"search ended: {reason}")
        write_summary(self.dir / "summary.csv", self._summary_rows(plan, history, search))
        plot_trials(self.dir / "trials.png", results, self.metric, self.config.performance.higher_is_better)
        table = trials_table(sorted(results, key=self._rank), self.metric, "auto-tune summary (best first)")
        wide(console).print(table)
        best = best_result(results, self.metric, self.config.performance.higher_is_better)
        if best is None:
            console.print(f"[red]no trial succeeded[/]; the reasons are in {history.path}")
            return 1
        best_path = self._write_best(best)
        console.print(f"[bold green]best[/]: trial {best.trial}, {best.candidate.describe()}: "
                      f"{best.tokens_per_s:,.0f} tokens/s, {best.step_time_ms:.1f} ms/step")
        console.print(f"  {len(results)} trial(s) for {len(plan.all_valid)} valid candidates; "
                      f"files: {self.dir}/{{history.csv,summary.csv,trials.png,best.yaml}}")
        console.print(f"  run it: python run.py --config-path {shlex.quote(str(best_path.parent))} "
                      "--config-name best action=run")
        if self.config.control.run_best and not reason.startswith("interrupted"):
            return run_best(self.best_job(best), self.run_job)
        return 0

    def _rank(self, r: TrialResult) -> tuple[int, float, int]:
        value = r.metric(self.metric)
        if value is None:
            return (1, 0.0, r.trial)
        return (0, -value if self.config.performance.higher_is_better else value, r.trial)

    def best_job(self, best: TrialResult) -> JobConfig:
        """The best strategy as a job of the user's own experiment (exp_dir, name), action=run."""
        task = self._full_task(best.candidate)
        return job_with(self.base, task, self.base.exp_dir, self.base.experiment.exp_name, "run")

    def _full_task(self, c: Candidate) -> dict[str, Any]:
        """The user's train section with only c's values changed (full schedule, checkpoints as configured)."""
        task = copy.deepcopy(self.base.task)
        for key, value in c.train_values(bool(self.work.num_experts)).items():
            set_leaf(task, key, value)
        return task

    def _write_best(self, best: TrialResult) -> Path:
        raw = dict(self.best_job(best).raw)
        raw["experiment"] = {**raw["experiment"], "auto_tuner": self.base.experiment.auto_tuner}
        path = self.dir / "best.yaml"
        write_best(path, raw, [
            f"Best strategy found by action=auto_tune (trial {best.trial}): {best.candidate.describe()}",
            f"measured {best.tokens_per_s:,.0f} tokens/s, {best.step_time_ms:.1f} ms/step, "
            f"peak {best.peak_mem_mb or 0:,.0f} MB",
            f"run: python run.py --config-path {path.parent} --config-name best action=run",
        ])
        return path

    def _summary_rows(self, plan: Plan, history: History, search: Search) -> list[dict[str, Any]]:
        done = history.by_key()
        rows = []
        for c in plan.all_valid:
            r = done.get(c.key)
            fate = (f"trial {r.trial}: {r.status.value}" if r else plan.memory_pruned.get(c.key)
                    or search.fates.get(c.key) or "not tried (the search stopped first)")
            rows.append({
                "key": c.key, "strategy": c.describe(), "fate": fate, "trial": r.trial if r else None,
                "status": r.status.value if r else None, "tokens_per_s": r.tokens_per_s if r else None,
                "step_time_ms": r.step_time_ms if r else None, "peak_mem_mb": r.peak_mem_mb if r else None,
                "estimate_mb": round(plan.estimates[c.key].peak_mb, 3),
                "predicted_step_ms": round(search.predicted_ms(c), 3), "reason": r.reason if r else None,
            })
        return sorted(rows, key=lambda row: (row["trial"] is None, row["trial"] or 0, row["key"]))


def run_best(job: JobConfig, run_job: RunJob | None) -> int:
    """control.run_best: start the best configuration with `run_job` (run.py's `run`, which prints how to follow
    it), else launch it here and say where it runs."""
    if run_job is not None:
        return run_job(job)
    record = jobs.launch(job)
    urls = " ".join(record.info.get("urls", {}).values())
    console.print(f"started the best configuration: job {record.run_id}, log {record.hosts[0].log_path}"
                  + (f", serving at {urls}" if urls else ""))
    return 0


def stop_orphan_trials(directory: Path, history: History) -> None:
    """Stop trials an interrupted earlier session left running (they have no history row)."""
    recorded = {r.trial for r in history.results}
    for trial_dir in sorted(directory.glob("trial_*")):
        number = trial_dir.name.split("_")[1]
        if not number.isdigit() or int(number) in recorded or not (trial_dir / "job.json").is_file():
            continue
        try:
            record = load_record(trial_dir)
            with Launcher.from_settings(record.settings) as launcher:
                state = launcher.job_state(record)
        except FlagScaleError:
            continue
        if state in (JobState.PENDING, JobState.RUNNING, JobState.UNKNOWN):
            console.print(f"stopping {trial_dir.name}, left running by an interrupted session")
            jobs.stop(trial_dir)


def auto_tune(job: JobConfig, run_job: RunJob | None = None) -> int:
    """Entry point of action=auto_tune; `run_job` starts the best configuration when control.run_best is set."""
    return Tuner(job, run_job).run()
