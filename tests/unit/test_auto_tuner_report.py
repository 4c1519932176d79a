"""Reports: the best trial, the live view without a terminal, summary.csv, trials.png, best.yaml."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import yaml
from rich.console import Console

from flagscale.auto_tuner.history import TrialResult, TrialStatus
from flagscale.auto_tuner.report import (
    SUMMARY_COLUMNS,
    best_result,
    plot_trials,
    training_view,
    write_best,
    write_summary,
)
from flagscale.auto_tuner.space import Candidate

A, B, C = (Candidate(dp=2, tp=1, pp=1, mbs=m) for m in (2, 4, 8))
RESULTS = [
    TrialResult(trial=1, candidate=A, status=TrialStatus.OK, tokens_per_s=900.0, step_time_ms=20.0,
                peak_mem_mb=400.0, estimate_mb=405.0),
    TrialResult(trial=2, candidate=B, status=TrialStatus.OK, tokens_per_s=1000.0, step_time_ms=18.0,
                peak_mem_mb=410.0, estimate_mb=408.0),
    TrialResult(trial=3, candidate=C, status=TrialStatus.OOM, reason="CUDA out of memory"),
]


def test_best_result_by_metric_direction() -> None:
    assert best_result(RESULTS, "tokens_per_s", True).trial == 2
    assert best_result(RESULTS, "step_time_ms", False).trial == 2
    assert best_result(RESULTS[2:], "tokens_per_s", True) is None


def test_live_view_prints_lines_without_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with training_view(console, "tokens_per_s", "trials", []) as view:
        view.start(3, C.describe(), "estimate 409 MB, predicted 12.5 ms/step")
        view.poll("iteration 4")
        view.finish(RESULTS[2])
    text = out.getvalue()
    assert "trial 3: dp2 tp1 pp1 mbs8 (estimate 409 MB, predicted 12.5 ms/step)" in text
    assert "trial 3: oom;" in text and "CUDA out of memory" in text


def test_summary_plot_and_best_yaml(tmp_path: Path) -> None:
    write_summary(tmp_path / "summary.csv", [{"key": A.key, "strategy": A.describe(), "fate": "trial 1: ok"}])
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert list(rows[0]) == list(SUMMARY_COLUMNS) and rows[0]["fate"] == "trial 1: ok"
    assert plot_trials(tmp_path / "trials.png", RESULTS, "tokens_per_s")
    assert (tmp_path / "trials.png").read_bytes()[:4] == b"\x89PNG"
    raw = {"action": "run", "experiment": {"exp_dir": "/x"}, "train": {"system": {"micro_batch_size": 4}}}
    write_best(tmp_path / "best.yaml", raw, ["Best strategy: dp2 tp1 pp1 mbs4", "run: python run.py ..."])
    text = (tmp_path / "best.yaml").read_text()
    assert text.startswith("# Best strategy: dp2 tp1 pp1 mbs4\n# run: python run.py ...\n")
    assert yaml.safe_load(text) == raw
