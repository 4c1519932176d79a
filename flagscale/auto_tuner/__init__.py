"""The auto-tuner (action=auto_tune): finds the fastest parallel strategy of a training config with
real trials run through the ordinary runner and launcher, pruned by the layout rules the training
program checks too (flagscale/config/layout.py), a memory model and the history of earlier trials.
See docs/auto_tuning.md. Importing the package is light (torch-free, no runner): `auto_tune` loads
the tuner when called."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flagscale.config.loader import JobConfig

__all__ = ["auto_tune"]


def auto_tune(job: JobConfig, run_job: Callable[[JobConfig], int] | None = None) -> int:
    """Entry point of action=auto_tune; `run_job` starts the best configuration when control.run_best is set."""
    from flagscale.auto_tuner.tuner import auto_tune as run

    return run(job, run_job)
