"""The training run: build model, optimizer, data and reporting, then loop, validate and save.

`train_gpt.py` is the script torchrun starts; this module does the work (keeping the script's
own imports light matters: dist_checkpointing's spawned helper process re-imports the script).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from flagscale.exceptions import FlagScaleError
from flagscale.train import checkpointing
from flagscale.train.arguments import parse_args
from flagscale.train.data import batches, build_datasets
from flagscale.train.metrics import NullReporter, Reporter, TrainRecord, log_line, peak_memory_mb
from flagscale.train.model import build_chunks, count_parameters, transformer_config, wrap
from flagscale.train.optim import build_optimizer, build_scheduler, connect_model_hooks
from flagscale.train.runtime import Runtime, initialize, shutdown
from flagscale.train.steps import AuxLosses, StepResult, evaluate, train_step
from flagscale.train.tokenizer import build_tokenizer, check_special_ids, padded_vocab_size


def print_rank0(message: str) -> None:
    """Print once for the whole job."""
    if dist.get_rank() == 0:
        print(message, flush=True)


@dataclass(slots=True)
class Window:
    """Figures accumulated between two log lines."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    grad_norm: float = 0.0
    aux_sums: dict[str, float | list[float]] = field(default_factory=dict)

    def add(self, result: StepResult, seconds: float) -> None:
        """Count one step."""
        self.steps += 1
        self.seconds += seconds
        if result.loss is not None:
            self.losses.append(result.loss)
        if result.grad_norm is not None:
            self.grad_norm = result.grad_norm
        for name, value in result.aux.items():
            total = self.aux_sums.get(name)
            if isinstance(value, list):
                self.aux_sums[name] = value if total is None else [a + b for a, b in zip(total, value, strict=True)]
            else:
                self.aux_sums[name] = value + (total or 0.0)

    def aux_means(self) -> dict[str, float | list[float]]:
        """MoE/MTP losses averaged over the window's steps."""
        return {
            name: [v / self.steps for v in total] if isinstance(total, list) else total / self.steps
            for name, total in self.aux_sums.items()
        }


@dataclass(slots=True)
class Trainer:
    """The model, optimizer, data and reporting of one run, and the loop over them."""

    args: argparse.Namespace
    runtime: Runtime
    model: list
    optimizer: object
    scheduler: object
    train_data: object
    valid_data: object
    reporter: Reporter
    aux_losses: AuxLosses
    last_saved: int = -1

    def _iterators(self, dataset, consumed: int) -> list:
        rt, dp = self.runtime, self.args.data_parallel_size
        return [batches(dataset, consumed, self.args, rt.dp_rank, dp) for _ in self.model]

    def run(self, start: int) -> int:
        """Train from iteration `start` to --train-iters (or an exit condition); return the last iteration."""
        args, iteration = self.args, start
        iterators = self._iterators(self.train_data, start * args.global_batch_size)
        window, began = Window(), time.monotonic()
        while iteration < args.train_iters:
            tick = time.perf_counter()
            result = train_step(
                args, self.model, self.optimizer, self.scheduler, iterators, self.runtime.device, self.aux_losses
            )
            iteration += 1
            window.add(result, time.perf_counter() - tick)
            if iteration % args.log_interval == 0 or iteration == args.train_iters:
                self._log(iteration, window)
                window = Window()
            if self.valid_data is not None and iteration % args.eval_interval == 0:
                self._validate(iteration)
            if args.save and args.save_interval and iteration % args.save_interval == 0:
                self._save(iteration)
            if self._should_exit(iteration, began):
                break
        if self.valid_data is not None and iteration % args.eval_interval and iteration > start:
            self._validate(iteration)
        if args.save and self.last_saved != iteration and iteration > start:
            self._save(iteration)
        return iteration

    def _log(self, iteration: int, window: Window) -> None:
        if not self.runtime.holds_loss or not window.losses:
            return
        args = self.args
        record = TrainRecord(
            iteration=iteration,
            loss=sum(window.losses) / len(window.losses),
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=window.grad_norm,
            tokens_per_s=window.steps * args.global_batch_size * args.seq_length / window.seconds,
            step_time_ms=1000 * window.seconds / window.steps,
            peak_mem_mb=peak_memory_mb(self.runtime.device),
            aux=window.aux_means(),
        )
        print(log_line(record, args.train_iters), flush=True)
        self.reporter.train(record)

    def _validate(self, iteration: int) -> None:
        loss = evaluate(self.args, self.model, self._iterators(self.valid_data, 0), self.runtime.device)
        if self.runtime.holds_loss and loss is not None:
            print(f" validation at iteration {iteration:>8d} | val loss {loss:.4f}", flush=True)
            self.reporter.valid(iteration, loss)

    def _save(self, iteration: int) -> None:
        tick = time.perf_counter()
        path = checkpointing.save(self.args, iteration, self.model, self.optimizer, self.scheduler)
        self.last_saved = iteration
        print_rank0(f"saved checkpoint {path} at iteration {iteration} in {time.perf_counter() - tick:.1f}s")
        self.reporter.checkpoint(iteration, path)

    def _should_exit(self, iteration: int, began: float) -> bool:
        args = self.args
        if args.exit_interval and iteration % args.exit_interval == 0:
            print_rank0(f"exiting at iteration {iteration} (--exit-interval {args.exit_interval})")
            return True
        if args.exit_duration_in_mins is None or iteration % args.log_interval:
            return False
        done = torch.tensor([float(time.monotonic() - began > 60 * args.exit_duration_in_mins)])
        dist.all_reduce(done, op=dist.ReduceOp.MAX)  # every rank stops at the same iteration
        if done.item():
            print_rank0(f"exiting at iteration {iteration} (--exit-duration-in-mins {args.exit_duration_in_mins})")
        return bool(done.item())


def _resume(args: argparse.Namespace, model: list, optimizer, scheduler) -> int:
    if not args.load:
        return 0
    if not Path(args.load).exists():
        print_rank0(f"no checkpoint at {args.load} (the folder does not exist); starting fresh")
        return 0
    iteration, path = checkpointing.load(args, model, optimizer, scheduler)
    if path is None:
        print_rank0(f"no checkpoint in {args.load} (no {checkpointing.TRACKER}); starting fresh")
    else:
        print_rank0(f"resuming from checkpoint {path} at iteration {iteration}")
    return iteration


def build_trainer(args: argparse.Namespace, runtime: Runtime) -> tuple[Trainer, int]:
    """Tokenizer, model, optimizer, checkpoint, data and reporter; (trainer, start iteration)."""
    tokenizer = build_tokenizer(args)
    vocab = padded_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    check_special_ids(tokenizer, vocab)
    config = transformer_config(args, runtime)
    chunks = build_chunks(args, config, vocab)
    experts = f" ep={args.expert_model_parallel_size} ({args.num_experts} experts)" if args.num_experts else ""
    print_rank0(
        f"> GPT on {runtime.device.type}: tp={args.tensor_model_parallel_size} pp={args.pipeline_model_parallel_size}"
        f" dp={args.data_parallel_size}{experts}, vocab {vocab} (tokenizer {tokenizer.vocab_size}),"
        f" {count_parameters(chunks):,} parameters on rank 0"
    )
    model = wrap(args, config, chunks, runtime)
    optimizer = build_optimizer(args, model)
    scheduler = build_scheduler(args, optimizer)
    connect_model_hooks(args, model, optimizer)
    start = _resume(args, model, optimizer, scheduler)
    train_data, valid_data = build_datasets(args, tokenizer)
    reporter = Reporter(args.metrics_dir, args.tensorboard_dir) if runtime.holds_loss else NullReporter()
    trainer = Trainer(
        args, runtime, model, optimizer, scheduler, train_data, valid_data, reporter, AuxLosses.from_args(args)
    )
    return trainer, start


def train(args: argparse.Namespace, runtime: Runtime, startup_s: dict[str, float] | None = None) -> None:
    """Build everything, train, report. `startup_s`: the seconds start-up took so far, by phase; building the
    model, optimizer, data and loading the checkpoint is added as `build`."""
    tick = time.time()
    trainer, start = build_trainer(args, runtime)
    startup = {**(startup_s or {}), "build": time.time() - tick}
    trainer.reporter.start(
        train_iters=args.train_iters, start_iteration=start, world_size=runtime.world_size,
        tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size, dp=args.data_parallel_size,
        startup_s={phase: round(seconds, 2) for phase, seconds in startup.items()},
    )
    tick = time.perf_counter()
    iteration = trainer.run(start)
    trainer.reporter.end(iteration)
    print_rank0(f"done: iteration {iteration}/{args.train_iters} in {time.perf_counter() - tick:.1f}s")


def _process_started(fallback: float) -> float:
    """When this process started (the interpreter's own start-up and imports count from there)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except (ImportError, OSError):
        return fallback


def main(argv: list[str] | None = None) -> int:
    """Run one rank; a FlagScaleError becomes one line on stderr and exit status 1."""
    try:
        imported = time.time()  # this module's imports (torch, Megatron-Core) are done by now
        args = parse_args(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        runtime = initialize(args)
        startup = {"imports": imported - _process_started(imported), "initialize": time.time() - imported}
        try:
            train(args, runtime, startup)
        finally:
            shutdown()
    except FlagScaleError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0
