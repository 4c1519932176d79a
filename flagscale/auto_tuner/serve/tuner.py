"""action=auto_tune on a serve config: expand the engines' spaces, prune what the engines say cannot serve the
load (space.fit_problems), run trials (real servers under the deployment's load profile) in the order the search
picks (search.py) until it stops, then write summary.csv, tradeoff.png and best.yaml (runnable by `flagscale
serve`) and print the follow-up commands. Everything lives under `<exp_dir>/auto_tuner/`; a second invocation
resumes from history.csv (a changed SLO or metric re-ranks the recorded trials without running them again)."""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from flagscale.auto_tuner.history import History, fingerprint
from flagscale.auto_tuner.report import LiveView, wide, write_best
from flagscale.auto_tuner.serve.config import METRICS, ServeTunerConfig, load_serve_tuner_config
from flagscale.auto_tuner.serve.history import SERVE_ROWS, ServeResult
from flagscale.auto_tuner.serve.report import plot_tradeoff, serve_line, serve_table, slo_text, write_summary
from flagscale.auto_tuner.serve.search import Objective, ServeSearch
from flagscale.auto_tuner.serve.space import ServeCandidate, deployment_of, fit_problems, generate, trial_item
from flagscale.auto_tuner.serve.trial import ServeTrialRun, run_serve_trial, serve_job
from flagscale.auto_tuner.tuner import RunJob, run_best, stop_orphan_trials
from flagscale.config.loader import JobConfig, select_hosts
from flagscale.exceptions import ConfigError
from flagscale.serve.deployment import parse_deployments
from flagscale.serve.engines import engine_for
from flagscale.serve.loadgen import LoadProfile

console = Console(highlight=False, soft_wrap=True)
DEFAULT_ENGINE = "vllm"


class ServeTuner:
    """One serving auto-tune session over the job `base` (one deployment)."""

    def __init__(self, base: JobConfig, run_job: RunJob | None = None) -> None:
        self.base, self.run_job = base, run_job
        runner = base.experiment.runner
        default = runner.deploy.engine or base.experiment.task.backend or DEFAULT_ENGINE
        deployments = parse_deployments(base.task, "serve", default_engine=default)
        if len(deployments) != 1:
            raise ConfigError(f"action=auto_tune tunes one deployment; the serve list has {len(deployments)} "
                              f"({', '.join(d.serve_id for d in deployments)}): keep the one to tune")
        self.item: dict[str, Any] = dict(base.task[0] if isinstance(base.task, list) else base.task)
        self.item.setdefault("engine", deployments[0].engine)
        if runner.deploy.port is not None:
            self.item.setdefault("engine_args", {}).setdefault("port", runner.deploy.port)
        self.deployment = deployments[0]
        self.hosts = select_hosts(base)
        devices = sum(runner.nproc_per_node or h.slots or 1 for h in self.hosts)
        self.config: ServeTunerConfig = load_serve_tuner_config(base.experiment.auto_tuner, self.deployment.engine,
                                                                devices)
        self._check_engines()
        self.notes = list(self.config.notes)
        profile = self.deployment.profile
        if profile is None:
            profile = LoadProfile()
            self.notes.append(f"serve[0] has no profile: measuring upstream's default load (input_len "
                              f"{profile.input_len}, output_len {profile.output_len}, {profile.num_prompts} prompts)")
        limit = self.config.control.trial_timeout_s
        self.profile = dataclasses.replace(profile, timeout_s=min(profile.timeout_s, limit))
        self.item["ready_timeout_s"] = min(self.deployment.ready_timeout_s, limit)
        performance = self.config.performance
        self.objective = Objective(metric=performance.metric, slo=dict(performance.slo))
        self.vocab_size = self._vocab_size()
        self.dir = base.exp_dir / "auto_tuner"
        self.fingerprint = fingerprint({"serve": measured_item(self.item), "profile": dataclasses.asdict(self.profile),
                                        "hosts": [(h.name, h.port) for h in self.hosts]})

    def _check_engines(self) -> None:
        for name in self.config.engines:
            engine = engine_for(name, "experiment.auto_tuner.engines:")
            problem = engine.missing(self.base.python) if self.base.python == sys.executable else None
            if problem:
                raise ConfigError(f"experiment.auto_tuner.engines: {problem}; or remove {name} from engines")

    def _vocab_size(self) -> int:
        if self.profile.vocab_size:
            return self.profile.vocab_size
        sizes = {}
        for name in self.config.engines:
            deployment = deployment_of(self.item, ServeCandidate(name))
            sizes[name] = engine_for(name).vocab_size(deployment)
        unknown = [name for name, size in sizes.items() if not size]
        if unknown:
            raise ConfigError(f"serve[0].profile.vocab_size is needed: the vocabulary of the model {unknown[0]} serves "
                              "could not be read from its files (the load's prompts are token ids below it)")
        return min(v for v in sizes.values() if v)

    def targets(self) -> dict[str, dict[str, Any]]:
        """Each engine's configured settings, by vLLM's and the engine's own names (where the scouts start)."""
        out = {}
        for name in self.config.engines:
            deployment = deployment_of(self.item, ServeCandidate(name))
            out[name] = {**deployment.engine_args, **engine_for(name).arguments(deployment)}
        return out

    def plan(self) -> tuple[list[ServeCandidate], list[ServeCandidate], dict[str, str]]:
        """(every candidate, those to search, why each other one was pruned)."""
        every = generate(self.config)
        pruned: dict[str, str] = {}
        for c in every:
            try:
                problems = fit_problems(self.item, c, self.profile, self.config.devices)
            except ConfigError as err:
                problems = [f"invalid: {err}"]
            if problems:
                pruned[c.key] = "pruned: " + "; ".join(problems)
        return every, [c for c in every if c.key not in pruned], pruned

    def run(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        history = History(self.dir / "history.csv", self.fingerprint, SERVE_ROWS, "deployment, load profile or hosts")
        stop_orphan_trials(self.dir, history)
        every, candidates, pruned = self.plan()
        self._print_plan(every, candidates, pruned, history)
        if not candidates:
            reason = Counter(pruned.values()).most_common(1)[0][0] if pruned else "the space is empty"
            raise ConfigError(f"no candidate is left to try; e.g. {reason}. Widen experiment.auto_tuner.space or "
                              "change serve[0].profile")
        control = self.config.control
        search = ServeSearch(candidates, self.config.space, self.targets(), self.objective, search=control.search,
                             stop_margin=control.stop_margin, min_gain=control.min_gain)
        try:
            reason = self._loop(candidates, history, search)
        except KeyboardInterrupt:
            self._finish(every, pruned, history, search, "interrupted (Ctrl-C); run the same command again to resume")
            return 130
        return self._finish(every, pruned, history, search, reason)

    def _loop(self, candidates: list[ServeCandidate], history: History, search: ServeSearch) -> str:
        control, began = self.config.control, time.time()
        keys = {c.key for c in candidates}
        view = LiveView(console, "serve auto-tune trials", history.results,
                        lambda rows, title, running: serve_table(rows, self.objective, title, running),
                        lambda r: serve_line(self.objective, r))
        with view:
            while True:
                if control.max_trials is not None and len(history.results) >= control.max_trials:
                    return f"max_trials ({control.max_trials}) reached"
                if control.max_time_s is not None and time.time() - began >= control.max_time_s:
                    return f"max_time_s ({control.max_time_s:.0f}s) reached"
                step = search.next({k: r for k, r in history.by_key().items() if k in keys})
                if step.candidate is None:
                    return step.stop_reason
                run = self.trial_run(history.next_trial, step.candidate)
                view.start(run.trial, run.candidate.describe())
                history.append(run_serve_trial(run, view.poll))
                view.finish(history.results[-1])

    def trial_run(self, trial: int, c: ServeCandidate) -> ServeTrialRun:
        name = f"{self.base.experiment.exp_name}-trial{trial}"
        job = serve_job(self.base, trial_item(self.item, c), self.dir / f"trial_{trial}", name, "run")
        return ServeTrialRun(trial=trial, candidate=c, job=job, serve_id=self.deployment.serve_id,
                             profile=self.profile, vocab_size=self.vocab_size, fingerprint=self.fingerprint)

    def _print_plan(self, every: list[ServeCandidate], candidates: list[ServeCandidate], pruned: dict[str, str],
                    history: History) -> None:
        engines = Counter(c.engine for c in candidates)
        slo = ", ".join(f"{k} {'>=' if METRICS[k] else '<='} {v:g}" for k, v in self.objective.slo.items()) or "none"
        p = self.profile
        console.print(f"[bold]serve auto-tune[/] {self.base.experiment.exp_name}: {len(every)} candidates "
                      f"({', '.join(f'{e} {n}' for e, n in engines.items())} to search), {len(pruned)} pruned; "
                      f"{'maximise' if self.objective.higher_is_better else 'minimise'} {self.objective.metric}, "
                      f"SLO: {slo}; search: {self.config.control.search}"
                      + (f"; resuming after {len(history.results)} recorded trial(s)" if history.results else ""))
        console.print(f"  load: {p.num_prompts} prompts of {p.prefix_len}+{p.input_len} tokens "
                      f"(x{p.range_ratio:g}..1), {p.output_len} new tokens (x{p.range_ratio:g}..1), "
                      f"{p.concurrency or p.num_prompts} at a time, token ids below {self.vocab_size}", markup=False)
        for reason, count in Counter(pruned.values()).most_common(6):
            console.print(f"  {reason} (x{count})", markup=False)
        for note in self.notes:
            console.print(f"  note: {note}", markup=False)
        console.print(f"  history: {history.path}")

    def _finish(self, every: list[ServeCandidate], pruned: dict[str, str], history: History, search: ServeSearch,
                reason: str) -> int:
        keys = {c.key for c in every}
        results = [r for r in history.results if r.candidate.key in keys]
        console.print(f"search ended: {reason}")
        best = self.objective.best(results)
        write_summary(self.dir / "summary.csv", self._summary_rows(every, pruned, history, search))
        plot_tradeoff(self.dir / "tradeoff.png", results, self.objective, best)
        ranked = sorted(results, key=lambda r: (self.objective.rank(r), -r.trial), reverse=True)
        wide(console).print(serve_table(ranked, self.objective, "serve auto-tune summary (best first)"))
        files = f"{self.dir}/{{history.csv,summary.csv,tradeoff.png{',best.yaml' if best else ''}}}"
        if best is None:
            closest = self.objective.closest(results)
            if closest is None:
                console.print(f"[red]no trial succeeded[/]; the reasons are in {history.path}")
                return 1
            missed = slo_text(self.objective, closest)
            console.print(f"[red]no configuration meets the SLO[/] ({len(results)} trial(s)); the closest is trial "
                          f"{closest.trial}, {closest.candidate.describe()}: {missed}. Relax experiment.auto_tuner."
                          f"performance.slo or widen the space; files: {files}")
            return 1
        path = self._write_best(best)
        value = best.metric(self.objective.metric) or 0.0
        console.print(f"[bold green]best[/]: trial {best.trial}, {best.candidate.describe()}: "
                      f"{self.objective.metric} {value:,.2f}; {len(results)} trial(s) of {len(every)} candidates "
                      f"({len(pruned)} pruned)")
        baseline = self.configured_result(results)
        if baseline is not None and baseline.metric(self.objective.metric):
            ratio = value / (baseline.metric(self.objective.metric) or 1.0)
            ratio = ratio if self.objective.higher_is_better else 1 / ratio
            console.print(f"  vs the configured settings (trial {baseline.trial}, {baseline.candidate.describe()}): "
                          f"{ratio:.2f}x" + ("" if self.objective.feasible(baseline) else " (those miss the SLO)"))
        console.print(f"  files: {files}")
        console.print(f"  serve it: flagscale serve {self.deployment.serve_id} {shlex.quote(str(path))}")
        if self.config.control.run_best and not reason.startswith("interrupted"):
            return run_best(self.best_job(best), self.run_job)
        return 0

    def configured_result(self, results: list[ServeResult]) -> ServeResult | None:
        """The trial of the deployment's own engine with its configured settings (if the space holds them)."""
        engine, targets = self.deployment.engine, self.targets()
        return next((r for r in results if r.candidate.engine == engine
                     and all(targets[engine].get(k) == v for k, v in r.candidate.settings)), None)

    def best_job(self, best: ServeResult) -> JobConfig:
        """The best configuration as the user's own serve job (their exp_dir and name), action=run."""
        return serve_job(self.base, trial_item(self.item, best.candidate), self.base.exp_dir,
                         self.base.experiment.exp_name, "run", keep_tuner=True)

    def _write_best(self, best: ServeResult) -> Path:
        path = self.dir / "best.yaml"
        f = best.figures
        write_best(path, dict(self.best_job(best).raw), [
            f"Best serving configuration found by action=auto_tune (trial {best.trial}): {best.candidate.describe()}",
            f"measured {f.get('output_tokens_per_s') or 0:,.0f} output tokens/s, {f.get('requests_per_s') or 0:,.2f} "
            f"requests/s, TTFT p95 {f.get('ttft_p95_ms') or 0:,.2f} ms, ITL p50 {f.get('itl_p50_ms') or 0:,.2f} ms",
            f"serve it: flagscale serve {self.deployment.serve_id} {path}",
        ])
        return path

    def _summary_rows(self, every: list[ServeCandidate], pruned: Mapping[str, str], history: History,
                      search: ServeSearch) -> list[dict[str, Any]]:
        done = history.by_key()
        rows = []
        for c in every:
            r: ServeResult | None = done.get(c.key)
            fate = (f"trial {r.trial}: {r.status.value}" if r else pruned.get(c.key) or search.fates.get(c.key)
                    or "not tried (the search stopped first)")
            rows.append({"key": c.key, "engine": c.engine, "settings": " ".join(f"{k}={v}" for k, v in c.settings),
                         "fate": fate, "trial": r.trial if r else None, "status": r.status.value if r else None,
                         "meets_slo": self.objective.feasible(r) if r else None,
                         "metric": r.metric(self.objective.metric) if r else None,
                         "ttft_p95_ms": r.metric("ttft_p95_ms") if r else None,
                         "itl_p50_ms": r.metric("itl_p50_ms") if r else None,
                         "output_tokens_per_s": r.metric("output_tokens_per_s") if r else None,
                         "reason": r.reason if r else None})
        return sorted(rows, key=lambda row: (row["trial"] is None, row["trial"] or 0, row["key"]))


def measured_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """The deployment as far as it shapes a measurement: without the port it listens on or how long start-up may take
    (a history recorded on another port is still valid)."""
    item = {k: v for k, v in item.items() if k != "ready_timeout_s"}
    item["engine_args"] = {k: v for k, v in dict(item.get("engine_args") or {}).items() if k != "port"}
    return item


def serve_auto_tune(job: JobConfig, run_job: RunJob | None = None) -> int:
    """action=auto_tune of a serve config."""
    return ServeTuner(job, run_job).run()
