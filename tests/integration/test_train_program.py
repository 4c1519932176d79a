"""flagscale/train/train_gpt.py under a real torchrun (2 CPU processes, gloo) on the tiny example data:
tp=2, pp=2 and dp=2 each converge and honour the metrics contract; resume continues where a run
stopped (exactly, with the distributed optimizer); sequence parallelism trains as tp alone does; a
corrupt checkpoint fails with one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, group_members

pytestmark = pytest.mark.integration

PROGRAM = str(REPO / "flagscale/train/train_gpt.py")
SMALL_MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2", "--seq-length", "64",
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout", "0",
    "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4",
    "--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--num-workers", "0",
    "--log-interval", "5", "--eval-interval", "10", "--eval-iters", "2", "--split", "98,1,1",
]  # fmt: skip


def data_args(data: Path) -> list[str]:
    return [
        "--tokenizer-model", str(data / "tokenizer"),
        "--data-path", "0.7", str(data / "stories_text_document"), "0.3", str(data / "facts_text_document"),
    ]  # fmt: skip


def torchrun(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """2 processes in a session of their own; fails the test if anything of it outlives torchrun."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", PROGRAM, *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        left = group_members([proc.pid])
        if proc.poll() is None or left:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"processes left behind by the run: {left}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, "")


def single_process(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The program without torchrun: a one-rank job."""
    return subprocess.run([sys.executable, PROGRAM, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def events(metrics_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (metrics_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(metrics: list[dict]) -> dict[int, float]:
    return {e["iteration"]: e["loss"] for e in metrics if e["event"] == "train"}


@pytest.mark.parametrize(
    ("layout", "sizes"),
    [
        (["--tensor-model-parallel-size", "2"], {"tp": 2, "pp": 1, "dp": 1}),
        (["--pipeline-model-parallel-size", "2"], {"tp": 1, "pp": 2, "dp": 1}),
        ([], {"tp": 1, "pp": 1, "dp": 2}),
    ],
    ids=["tp2", "pp2", "dp2"],
)
def test_converges_and_reports(tiny_data: Path, tmp_path: Path, layout: list[str], sizes: dict) -> None:
    metrics_dir = tmp_path / "metrics"
    run = torchrun(*SMALL_MODEL, *data_args(tiny_data), *layout, "--train-iters", "40",
                   "--metrics-dir", str(metrics_dir))  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    assert "iteration       40/      40 | loss" in run.stdout
    metrics = events(metrics_dir)
    start, end = metrics[0], metrics[-1]
    assert start["event"] == "start" and end == {"event": "end", "iteration": 40, "time": end["time"]}
    assert {k: start[k] for k in ("tp", "pp", "dp", "world_size", "train_iters", "start_iteration")} == {
        **sizes, "world_size": 2, "train_iters": 40, "start_iteration": 0,
    }  # fmt: skip
    startup = start["startup_s"]  # where a (re)start's time goes, by phase
    assert set(startup) == {"imports", "initialize", "build"} and all(0 <= s < 300 for s in startup.values())
    assert startup["imports"] > 0.5, startup  # the interpreter and torch + Megatron-Core, counted from process start
    losses = train_losses(metrics)
    assert sorted(losses) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert losses[40] < losses[5] - 1.5, losses
    train = next(e for e in metrics if e["event"] == "train")
    assert set(train) == {"event", "iteration", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_ms",
                          "peak_mem_mb", "time"}  # fmt: skip
    assert train["tokens_per_s"] > 0 and train["peak_mem_mb"] > 50
    assert [e["iteration"] for e in metrics if e["event"] == "valid"] == [10, 20, 30, 40]
    assert (metrics_dir / "loss_curve.png").stat().st_size > 5000
    assert list((metrics_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_continues_from_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    ckpt, metrics_dir = tmp_path / "ckpt", tmp_path / "metrics"
    common = [*SMALL_MODEL, *data_args(tiny_data), "--tensor-model-parallel-size", "2", "--save", str(ckpt),
              "--load", str(ckpt), "--save-interval", "10", "--metrics-dir", str(metrics_dir)]  # fmt: skip
    first = torchrun(*common, "--train-iters", "20")
    assert first.returncode == 0, first.stdout[-3000:]
    assert "starting fresh" in first.stdout
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "20"
    second = torchrun(*common, "--train-iters", "30")
    assert second.returncode == 0, second.stdout[-3000:]
    assert f"resuming from checkpoint {ckpt / 'iter_0000020'} at iteration 20" in second.stdout
    starts = [e for e in events(metrics_dir) if e["event"] == "start"]
    assert [(s["start_iteration"], s["train_iters"]) for s in starts] == [(0, 20), (20, 30)]
    saved = [e["iteration"] for e in events(metrics_dir) if e["event"] == "checkpoint"]
    assert saved == [10, 20, 30]
    assert sorted(train_losses(events(metrics_dir))) == [5, 10, 15, 20, 25, 30]


def test_resume_is_exact_with_distributed_optimizer(tiny_data: Path, tmp_path: Path) -> None:
    """Stopping at 6 (--exit-interval) and resuming gives the same losses as one run to 12."""
    common = [*SMALL_MODEL, *data_args(tiny_data), "--use-distributed-optimizer", "--train-iters", "12",
              "--log-interval", "2"]  # fmt: skip
    whole = single_process(*common, "--metrics-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    split = [*common, "--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt"),
             "--metrics-dir", str(tmp_path / "split")]  # fmt: skip
    assert single_process(*split, "--exit-interval", "6").returncode == 0
    resumed = single_process(*split)
    assert resumed.returncode == 0 and "at iteration 6" in resumed.stdout, resumed.stderr[-3000:]
    expected, got = train_losses(events(tmp_path / "whole")), train_losses(events(tmp_path / "split"))
    assert sorted(got) == sorted(expected) == list(range(2, 13, 2))
    assert got == pytest.approx(expected, rel=1e-6)


def test_corrupt_checkpoint_is_a_clear_error(tiny_data: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000010").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("10\n")
    run = single_process(*SMALL_MODEL, *data_args(tiny_data), "--train-iters", "20", "--load", str(ckpt))
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {ckpt / 'iter_0000010'} is incomplete or corrupt: no metadata.json"
    )


@pytest.mark.slow
def test_sequence_parallel_trains_like_tensor_parallel_alone(tiny_data: Path, tmp_path: Path) -> None:
    """tp=2 with sequence parallelism on the CPU gives the losses and gradient norms of tp=2 without it.
    The gradient norms are the sharp check: were the norm weights' gradients not summed over the tp ranks
    (cpu_shims marks them), they would differ by ~1e-3 while the losses drift by only ~1e-6."""
    common = [*SMALL_MODEL, *data_args(tiny_data), "--tensor-model-parallel-size", "2", "--train-iters", "10",
              "--log-interval", "2"]  # fmt: skip
    losses, grad_norms = {}, {}
    for name, extra in (("tp2", []), ("tp2_sp", ["--sequence-parallel"])):
        run = torchrun(*common, *extra, "--metrics-dir", str(tmp_path / name))
        assert run.returncode == 0, run.stdout[-3000:]
        metrics = events(tmp_path / name)
        losses[name] = train_losses(metrics)
        grad_norms[name] = {e["iteration"]: e["grad_norm"] for e in metrics if e["event"] == "train"}
    assert sorted(losses["tp2_sp"]) == list(range(2, 11, 2))
    assert losses["tp2"][10] < losses["tp2"][2] - 0.5, losses
    assert losses["tp2_sp"] == pytest.approx(losses["tp2"], rel=1e-6)
    assert grad_norms["tp2_sp"] == pytest.approx(grad_norms["tp2"], rel=1e-5)
