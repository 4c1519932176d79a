"""The tuner's orchestration with a fake trial runner (no process starts): trial configs, history,
OOM pruning, early stop, reports, best.yaml, resume, and errors before anything runs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from flagscale.auto_tuner import tuner as tuner_module
from flagscale.auto_tuner.history import TrialResult, TrialStatus
from flagscale.auto_tuner.trial import TrialRun
from flagscale.config.loader import load_job_config
from flagscale.exceptions import ConfigError
from flagscale.main import compose_config
from tests.conftest import REPO

SMALL = ["train.model.num_layers=2", "train.model.hidden_size=64", "train.model.ffn_hidden_size=176",
         "train.model.num_attention_heads=2", "train.model.seq_length=64", "train.model.max_position_embeddings=64"]


def job(tmp_path: Path, *extra: str):
    overrides = [f"experiment.exp_dir={tmp_path}", *SMALL, "+experiment.auto_tuner.memory_model.device_memory_mb=1e6",
                 "+experiment.auto_tuner.memory_model.vocab_size=929", *extra]
    cfg, source = compose_config(REPO / "examples/tiny_gpt/conf", "auto_tune", overrides)
    return load_job_config(cfg, source)


class FakeTrials:
    """Step time = 100 ms / mbs (+50% with recompute, +20% with tp/pp); mbs 8 without recompute: OOM."""

    def __init__(self) -> None:
        self.runs: list[TrialRun] = []

    def __call__(self, run: TrialRun, control, limit_s, on_poll) -> TrialResult:
        self.runs.append(run)
        c = run.candidate
        if c.mbs == 8 and c.recompute is None:
            return TrialResult(trial=run.trial, candidate=c, status=TrialStatus.OOM, reason="CUDA out of memory",
                               exp_dir=str(run.exp_dir), fingerprint=run.fingerprint)
        ms = 100 / c.mbs * (1.5 if c.recompute else 1.0) * (1.2 if c.dp == 1 else 1.0)
        return TrialResult(trial=run.trial, candidate=c, status=TrialStatus.OK, step_time_ms=ms,
                           tokens_per_s=16 * 64 * 1000 / ms, peak_mem_mb=400.0, estimate_mb=run.estimate_mb,
                           measured_iterations=25, exp_dir=str(run.exp_dir), fingerprint=run.fingerprint)


def test_tuner_with_fake_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTrials()
    monkeypatch.setattr(tuner_module, "run_trial", fake)
    assert tuner_module.auto_tune(job(tmp_path)) == 0
    out = tmp_path / "auto_tuner"
    first = fake.runs[0]
    assert first.candidate.mbs == 8 and first.candidate.recompute is None  # the favourite: OOM here
    assert first.job.exp_dir == out / "trial_1" and first.job.action == "run"
    assert first.job.experiment.auto_tuner is None and "auto_tuner" not in first.job.raw["experiment"]
    assert first.job.task["model"]["train_iters"] == 30 and first.job.task["system"]["logging"]["log_interval"] == 1
    assert first.job.task["system"]["checkpoint"]["save"] is None
    tried = {r.candidate.key for r in fake.runs}
    assert len(tried) == len(fake.runs) < 24  # nothing twice; early stop before the grid is exhausted
    summary = {row["strategy"]: row["fate"] for row in csv.DictReader((out / "summary.csv").open())}
    assert summary["dp2 tp1 pp1 mbs8"] == "trial 1: oom"
    assert all(fate.startswith(("trial", "pruned", "skipped")) for fate in summary.values())
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["action"] == "run" and best["experiment"]["exp_dir"] == str(tmp_path)
    assert best["train"]["model"]["micro_batch_size"] == 8 and best["train"]["model"]["train_iters"] == 300
    assert best["train"]["system"]["recompute_granularity"] == "full"  # mbs 8 fits only with recompute
    assert best["train"]["system"]["checkpoint"]["save"] == f"{tmp_path}/checkpoints"
    assert (out / "trials.png").is_file()

    again = FakeTrials()
    monkeypatch.setattr(tuner_module, "run_trial", again)
    assert tuner_module.auto_tune(job(tmp_path)) == 0
    assert again.runs == []  # resumed: every decision is the same, nothing re-runs


def test_memory_budget_below_everything_is_an_error_before_any_trial(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuner_module, "run_trial", FakeTrials())
    with pytest.raises(ConfigError, match="no candidate is left"):
        tuner_module.auto_tune(job(tmp_path, "experiment.auto_tuner.memory_model.device_memory_mb=0.5"))


def test_only_train_jobs(tmp_path: Path) -> None:
    tuner_job = job(tmp_path)
    tuner_job.experiment.task.type = "serve"
    with pytest.raises(ConfigError, match="tunes training jobs"):
        tuner_module.Tuner(tuner_job)


def test_unknown_auto_tuner_key_via_run_py(tmp_path: Path) -> None:
    from tests.conftest import run_py

    proc = run_py("--config-path", str(REPO / "examples/tiny_gpt/conf"), "--config-name", "auto_tune",
                  f"experiment.exp_dir={tmp_path}", "+experiment.auto_tuner.control.max_trial=3")
    assert proc.returncode != 0 and "did you mean 'max_trials'?" in proc.stderr and "Traceback" not in proc.stderr


def test_candidates_against_the_jobs_own_settings_are_invalid_before_any_trial(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTrials()
    monkeypatch.setattr(tuner_module, "run_trial", fake)
    tuner_job = job(tmp_path, "+train.system.use_distributed_optimizer=true", "+train.system.overlap_param_gather=true",
                    "++experiment.auto_tuner.space.use_distributed_optimizer=[true,false]",
                    "experiment.auto_tuner.space.recompute_granularity=null")
    plan = tuner_module.Tuner(tuner_job).plan()
    assert plan.invalid and all(problems == ["overlap_param_gather needs use_distributed_optimizer"]
                                for problems in plan.invalid.values())
    assert plan.candidates and all(c.dist_opt for c in plan.candidates)  # dp 1 too: overlap_param_gather needs it
    assert tuner_module.auto_tune(tuner_job) == 0
    assert fake.runs and all(run.candidate.dist_opt for run in fake.runs)


def test_candidates_the_program_rejects_are_dropped_without_a_trial(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTrials()
    monkeypatch.setattr(tuner_module, "run_trial", fake)
    monkeypatch.setattr(tuner_module, "program_problems",
                        lambda task, world: ["refused here"] if task["model"]["micro_batch_size"] == 8 else [])
    assert tuner_module.auto_tune(job(tmp_path, "experiment.auto_tuner.space.recompute_granularity=null")) == 0
    assert fake.runs and all(run.candidate.mbs != 8 for run in fake.runs)
    summary = {row["strategy"]: row["fate"] for row in csv.DictReader((tmp_path / "auto_tuner/summary.csv").open())}
    assert summary["dp2 tp1 pp1 mbs8"] == "invalid: arguments: refused here"


def test_a_huge_space_is_refused(tmp_path: Path) -> None:
    from flagscale.auto_tuner.config import SpaceConfig
    from flagscale.auto_tuner.space import generate
    from tests.unit.test_auto_tuner_rules import CURRENT, TINY

    everything = SpaceConfig(**{name: "auto" for name in SpaceConfig.__dataclass_fields__})
    big = TINY.__class__(**{**{f: getattr(TINY, f) for f in TINY.__dataclass_fields__}, "world_size": 64,
                            "num_layers": 64, "global_batch_size": 1024})
    with pytest.raises(ConfigError, match="give lists instead of 'auto'"):
        generate(everything, big, CURRENT)


def test_upstream_keys_are_read_and_noted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(tuner_module, "run_trial", FakeTrials())
    tuner_job = job(tmp_path, "~experiment.auto_tuner.control.trial_timeout_s",
                    "+experiment.auto_tuner.control.max_time_per_task=120",
                    "+experiment.auto_tuner.space.use_recompute=[false]")
    tuner = tuner_module.Tuner(tuner_job)
    assert tuner.config.control.trial_timeout_s == 120 and tuner.config.space.recompute_granularity == [None]
    assert tuner.run() == 0
    out = capsys.readouterr().out
    assert "note: experiment.auto_tuner.control.max_time_per_task (upstream) read as control.trial_timeout_s" in out


def test_memory_utilization_bounds_prune_both_ways(tmp_path: Path) -> None:
    tuner = tuner_module.Tuner(job(tmp_path, "+experiment.auto_tuner.memory_model.utilization=[0.5,1.0]"))
    plan = tuner.plan()
    assert not plan.candidates and plan.memory_pruned
    assert all(fate.endswith("(utilization min)") for fate in plan.memory_pruned.values())
