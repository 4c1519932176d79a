"""What the training program reports: the stdout log line, metrics.jsonl, TensorBoard, a loss curve.

The metrics contract (read by the launcher, `query`, progress bars and benchmarks) — one JSON object
per line in `<metrics-dir>/metrics.jsonl`, flushed after each line, written by the one rank that
holds the loss (last pipeline stage, TP rank 0, DP rank 0):

    {"event": "start", "train_iters", "start_iteration", "world_size", "tp", "pp", "dp", "time",
     "startup_s": {"imports", "initialize", "build"}}
    {"event": "train", "iteration", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_ms",
     "peak_mem_mb", "time"}
        + with experts: "moe_<loss>" (mean over MoE layers) and "moe_<loss>_per_layer" for each router
          loss computed (load_balancing_loss, seq_load_balancing_loss, global_load_balancing_loss,
          z_loss; divided by their coefficients, as Megatron-LM logs them)
        + with multi-token prediction: "mtp_loss" (mean over MTP depths) and "mtp_loss_per_layer"
    {"event": "valid", "iteration", "val_loss", "time"}
    {"event": "checkpoint", "iteration", "path"}
    {"event": "end", "iteration", "time"}
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import torch

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainRecord:
    """One log interval's figures."""

    iteration: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    step_time_ms: float
    peak_mem_mb: float
    aux: dict[str, float | list[float]] = field(default_factory=dict)
    """MoE router and MTP losses (steps.AuxLosses), averaged over the interval; empty for a dense model."""


_CORE_FIELDS = ("iteration", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_ms", "peak_mem_mb")


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on GPU; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def log_line(record: TrainRecord, train_iters: int) -> str:
    """Megatron-like stdout line for one log interval."""
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return (
        f" [{stamp}] iteration {record.iteration:>8d}/{train_iters:>8d} | loss {record.loss:.4f}"
        f" | lr {record.lr:.1E} | grad norm {record.grad_norm:.3f} | tokens/s {record.tokens_per_s:.0f}"
        f" | step {record.step_time_ms:.1f} ms | peak mem {record.peak_mem_mb:.0f} MB"
    ) + "".join(f" | {name.replace('_', ' ')} {value:.4f}" for name, value in _scalars(record))


def _scalars(record: TrainRecord) -> list[tuple[str, float]]:
    """The record's aux losses that are one number (not per layer)."""
    return [(name, value) for name, value in record.aux.items() if not isinstance(value, list)]


class Reporter:
    """Writes metrics.jsonl, TensorBoard scalars and the loss curve (on the rank holding the loss)."""

    def __init__(self, metrics_dir: str | None, tensorboard_dir: str | None) -> None:
        self._dir = Path(metrics_dir) if metrics_dir else None
        self._file: IO[str] | None = None
        self._tb = None
        if self._dir:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._file = (self._dir / METRICS_FILE).open("a", encoding="utf-8")
            tensorboard_dir = tensorboard_dir or str(self._dir / "tensorboard")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard_dir)

    def _event(self, event: str, **fields: Any) -> None:
        if self._file:
            self._file.write(json.dumps({"event": event, **fields}) + "\n")
            self._file.flush()

    def start(self, *, train_iters: int, start_iteration: int, world_size: int, tp: int, pp: int, dp: int,
              startup_s: dict[str, float] | None = None) -> None:
        """The run begins (or resumes at start_iteration); `startup_s`: how long this rank's start-up took, by
        phase (imports, initialize, build)."""
        self._event(
            "start", train_iters=train_iters, start_iteration=start_iteration,
            world_size=world_size, tp=tp, pp=pp, dp=dp, startup_s=startup_s or {}, time=time.time(),
        )

    def train(self, record: TrainRecord) -> None:
        """One log interval."""
        self._event("train", **{f: getattr(record, f) for f in _CORE_FIELDS}, **record.aux, time=time.time())
        if self._tb:
            for name in _CORE_FIELDS[1:]:
                self._tb.add_scalar(f"train/{name}", getattr(record, name), record.iteration)
            for name, value in _scalars(record):
                self._tb.add_scalar(f"train/{name}", value, record.iteration)

    def valid(self, iteration: int, val_loss: float) -> None:
        """One validation."""
        self._event("valid", iteration=iteration, val_loss=val_loss, time=time.time())
        if self._tb:
            self._tb.add_scalar("valid/loss", val_loss, iteration)

    def checkpoint(self, iteration: int, path: Path) -> None:
        """A checkpoint was saved."""
        self._event("checkpoint", iteration=iteration, path=str(path))

    def end(self, iteration: int) -> None:
        """The run finished: last event, loss curve, close files."""
        self._event("end", iteration=iteration, time=time.time())
        if self._tb:
            self._tb.close()
        if self._file:
            self._file.close()
            plot_loss_curve(self._dir / METRICS_FILE, self._dir / LOSS_CURVE_FILE)


class NullReporter(Reporter):
    """What every rank that does not hold the loss reports: nothing."""

    def __init__(self) -> None:
        super().__init__(None, None)


def read_curves(metrics_file: Path) -> dict[str, dict[int, float]]:
    """Train and validation loss by iteration from metrics.jsonl (all runs; the latest wins)."""
    curves: dict[str, dict[int, float]] = {"train": {}, "valid": {}}
    with metrics_file.open(encoding="utf-8") as handle:
        for line in handle:
            event = json.loads(line)
            if event["event"] == "train":
                curves["train"][event["iteration"]] = event["loss"]
            elif event["event"] == "valid":
                curves["valid"][event["iteration"]] = event["val_loss"]
    return curves


def plot_loss_curve(metrics_file: Path, path: Path) -> None:
    """Train and validation loss against iteration, as a PNG."""
    curves = read_curves(metrics_file)
    if not curves["train"]:
        return
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, style in (("train", "-"), ("valid", "o--")):
        if curves[name]:
            steps = sorted(curves[name])
            ax.plot(steps, [curves[name][s] for s in steps], style, label=f"{name} loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
