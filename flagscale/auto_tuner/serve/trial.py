"""One serving trial: the user's serve job with the candidate's engine and settings, started through the same
runner and launcher as any job (`jobs.launch`, which returns once the server answers), measured under the
deployment's load profile (flagscale/serve/loadgen.py), then stopped (`jobs.stop`) whatever happened."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flagscale import jobs
from flagscale.auto_tuner.history import TrialStatus
from flagscale.auto_tuner.serve.history import FIGURES, ServeResult
from flagscale.auto_tuner.serve.space import ServeCandidate
from flagscale.auto_tuner.trial import classify_failure
from flagscale.config.loader import ConfigSource, JobConfig
from flagscale.exceptions import ConfigError, FlagScaleError
from flagscale.serve.loadgen import LoadProfile, run_load


@dataclass(slots=True, kw_only=True)
class ServeTrialRun:
    """A trial about to run."""

    trial: int
    candidate: ServeCandidate
    job: JobConfig
    serve_id: str
    profile: LoadProfile
    vocab_size: int
    fingerprint: str

    @property
    def exp_dir(self) -> Path:
        return self.job.exp_dir


def serve_job(base: JobConfig, item: dict[str, Any], exp_dir: Path | str, exp_name: str, action: str,
              keep_tuner: bool = False) -> JobConfig:
    """A JobConfig like `base` serving the one deployment `item`, in another exp_dir, with another action."""
    raw = copy.deepcopy(base.raw)
    experiment = {**raw["experiment"], "exp_dir": str(exp_dir), "exp_name": exp_name}
    if not keep_tuner:
        experiment.pop("auto_tuner", None)
    raw["experiment"], raw["serve"], raw["action"] = experiment, [item], action
    spec = dataclasses.replace(base.experiment, exp_dir=str(exp_dir), exp_name=exp_name,
                               auto_tuner=base.experiment.auto_tuner if keep_tuner else None)
    return JobConfig(action=action, experiment=spec, task=[item], source=ConfigSource(), raw=raw,
                     referenced=base.referenced)


def run_serve_trial(run: ServeTrialRun, on_progress: Callable[[str], None] = lambda _: None) -> ServeResult:
    """Start the server, run the load, stop it; Ctrl-C stops the server and re-raises."""
    began = time.time()
    on_progress("starting the server")
    try:
        record = jobs.launch(run.job, on_wait=on_progress)
    except FlagScaleError as err:
        if not isinstance(err, ConfigError) and not (run.exp_dir / "job.json").is_file():
            raise  # nothing started (a port in use, a host that does not answer): every trial would fail alike
        status, reason = classify_failure(str(err).split("\n", 1)[-1])
        return _result(run, began, status, reason=f"the server did not start: {reason}")
    except KeyboardInterrupt:
        if (run.exp_dir / "job.json").is_file():
            jobs.stop(run.exp_dir)
        raise
    startup = time.time() - began
    try:
        urls, models = record.info["urls"], record.info["models"]
        names = [run.serve_id] if run.serve_id in urls else sorted(n for n in urls if n.startswith(f"{run.serve_id}-"))
        spec = dataclasses.replace(run.profile.spec(urls[names[0]], models[names[0]], run.vocab_size),
                                   more_urls=tuple(urls[n] for n in names[1:]))
        report = run_load(spec, lambda done, total: on_progress(f"request {done}/{total}"))
    finally:
        jobs.stop(run.exp_dir)
    figures = report.figures()
    failed = int(figures["failed"])
    measured = {name: figures.get(name) for name in FIGURES}
    if failed:
        return _result(run, began, TrialStatus.FAILED, figures=measured, failed_requests=failed, startup_s=startup,
                       reason=f"{failed} of {figures['requests']} requests failed: {figures.get('first_error', '')}")
    return _result(run, began, TrialStatus.OK, figures=measured, startup_s=startup)


def _result(run: ServeTrialRun, began: float, status: TrialStatus, **fields: Any) -> ServeResult:
    return ServeResult(trial=run.trial, candidate=run.candidate, status=status, elapsed_s=time.time() - began,
                       exp_dir=str(run.exp_dir), fingerprint=run.fingerprint, **fields)
