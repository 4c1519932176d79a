"""history.csv (round trip, resume, torn rows, foreign history), trial configs, metric summaries and
failure classification, without starting a process."""

from __future__ import annotations

from pathlib import Path

import pytest

from flagscale.auto_tuner.config import ControlConfig
from flagscale.auto_tuner.history import History, TrialResult, TrialStatus
from flagscale.auto_tuner.space import Candidate
from flagscale.auto_tuner.trial import classify_failure, set_leaf, summarize, trial_task
from flagscale.exceptions import ConfigError

C = Candidate(dp=1, tp=2, pp=1, mbs=4, recompute="full", recompute_method="uniform", recompute_layers=1)


def result(trial: int, candidate: Candidate = C, status: TrialStatus = TrialStatus.OK) -> TrialResult:
    return TrialResult(trial=trial, candidate=candidate, status=status, tokens_per_s=1234.5, step_time_ms=12.25,
                       peak_mem_mb=410.0, estimate_mb=12.0, measured_iterations=25, elapsed_s=30.0,
                       reason="a, \"quoted\" reason", exp_dir="/x/trial_1", fingerprint="abc")


def test_round_trip_and_resume(tmp_path: Path) -> None:
    history = History(tmp_path / "history.csv", "abc")
    history.append(result(1))
    history.append(result(2, Candidate(dp=2, tp=1, pp=1, mbs=8, dist_opt=True), TrialStatus.OOM))
    again = History(tmp_path / "history.csv", "abc")
    assert again.results == history.results
    assert set(again.by_key()) == {C.key, "dp2.tp1.pp1.cp1.ep1.sp0.vpl0.mbs8.rc-none.do1"}
    assert again.next_trial == 3


def test_trial_directories_on_disk_are_not_reused(tmp_path: Path) -> None:
    (tmp_path / "trial_7").mkdir()  # an interrupted trial: no row, but its folder exists
    assert History(tmp_path / "history.csv", "abc").next_trial == 8


def test_torn_last_row_is_skipped_and_the_next_append_starts_a_new_line(tmp_path: Path) -> None:
    path = tmp_path / "history.csv"
    history = History(path, "abc")
    history.append(result(1))
    with path.open("a") as handle:
        handle.write("2,dp2.tp1")  # killed mid-write
    resumed = History(path, "abc")
    assert [r.trial for r in resumed.results] == [1]
    resumed.append(result(3))
    assert [r.trial for r in History(path, "abc").results] == [1, 3]


def test_history_of_another_job_is_refused(tmp_path: Path) -> None:
    History(tmp_path / "history.csv", "abc").append(result(1))
    with pytest.raises(ConfigError, match="different training config"):
        History(tmp_path / "history.csv", "other")


def test_trial_task_sets_candidate_and_short_schedule() -> None:
    task = {"system": {"tensor_model_parallel_size": 1, "logging": {"log_interval": 10},
                       "checkpoint": {"save": "/ckpt", "load": "/ckpt", "save_interval": 100}},
            "model": {"micro_batch_size": 2, "train_iters": 300, "eval_interval": 50, "eval_iters": 4}}
    out = trial_task(task, C, ControlConfig(iterations=12, warmup_iterations=2), 300, with_experts=False)
    assert out["system"]["tensor_model_parallel_size"] == 2 and out["model"]["micro_batch_size"] == 4
    assert out["system"]["recompute_granularity"] == "full" and out["system"]["recompute_num_layers"] == 1
    assert out["model"]["train_iters"] == 12 and out["model"]["eval_interval"] == 12
    assert out["system"]["logging"]["log_interval"] == 1 and out["system"]["lr_decay_iters"] == 300
    assert out["system"]["checkpoint"] == {"save": None, "load": None, "save_interval": None}
    assert "sequence_parallel" not in out["system"] and "use_distributed_optimizer" not in out["system"]
    assert task["model"]["micro_batch_size"] == 2  # the user's config is untouched


def test_set_leaf_finds_nested_keys() -> None:
    task = {"model": {"optimizer": {"lr": 1.0}}}
    set_leaf(task, "lr", 2.0)
    set_leaf(task, "micro_batch_size", 8)
    set_leaf(task, "sequence_parallel", False)
    assert task == {"model": {"optimizer": {"lr": 2.0}}, "micro_batch_size": 8}


def test_summarize_uses_medians_after_warmup() -> None:
    events = [{"event": "train", "iteration": i, "tokens_per_s": 1000.0 / ms, "step_time_ms": ms,
               "peak_mem_mb": 400.0 + i} for i, ms in enumerate([500, 10, 12, 11, 90, 13], start=1)]
    figures = summarize(events, warmup=1)
    assert figures["step_time_ms"] == 12 and figures["measured_iterations"] == 5
    assert figures["tokens_per_s"] == pytest.approx(1000 / 12) and figures["peak_mem_mb"] == 406.0
    assert summarize([], 1)["tokens_per_s"] is None


@pytest.mark.parametrize(
    ("log", "status", "reason"),
    [
        ("[default0]:[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
         TrialStatus.OOM, "torch.OutOfMemoryError: CUDA out of memory"),
        ("[default1]:[rank1]: RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 9",
         TrialStatus.OOM, "can't allocate memory"),
        ("exitcode  : -9 (pid: 4242)\n traceback : Signal 9 (SIGKILL) received by PID 4242",
         TrialStatus.OOM, "exitcode  : -9"),
        ("[default0]:[rank0]: AssertionError: Torch not compiled with CUDA enabled\n"
         "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
         TrialStatus.FAILED, "AssertionError: Torch not compiled with CUDA enabled"),
        ("[default0]:error: invalid training arguments\nother", TrialStatus.FAILED, "error: invalid training"),
        ("", TrialStatus.FAILED, "no log output"),
    ],
)
def test_classify_failure(log: str, status: TrialStatus, reason: str) -> None:
    got_status, got_reason = classify_failure(log)
    assert got_status is status and reason in got_reason
