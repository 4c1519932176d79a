"""The auto-tuners (action=auto_tune). Training: finds the fastest parallel strategy of a training config with
real trials run through the ordinary runner and launcher, pruned by the layout rules the training
program checks too (flagscale/config/layout.py), a memory model and the history of earlier trials.
Serving (serve/): the best engine and engine settings under a latency SLO, with real servers under a load profile.
See docs/auto_tuning.md. Importing the package is light (torch-free, no runner): `auto_tune` loads
the tuner when called."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flagscale.config.loader import JobConfig

__all__ = ["auto_tune"]


def auto_tune(job: JobConfig, run_job: Callable[[JobConfig], int] | None = None) -> int:
    """Entry point of action=auto_tune (a training or a serve config); `run_job` starts the best configuration when
    control.run_best is set."""
    if job.experiment.task.type == "serve":
        from flagscale.auto_tuner.serve.tuner import serve_auto_tune

        return serve_auto_tune(job, run_job)
    from flagscale.auto_tuner.tuner import auto_tune as run

    return run(job, run_job)
