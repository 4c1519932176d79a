"""One training step and one evaluation, through Megatron-Core's pipeline schedules.

`get_forward_backward_func()` picks the schedule (no pipelining, 1F1B, or interleaved 1F1B);
the loss is summed per token and reported as (sum, count) so it can be averaged exactly over
micro batches and data-parallel ranks.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from flagscale.train.data import to_device


@dataclass(frozen=True, slots=True, kw_only=True)
class StepResult:
    """What one optimizer step reports."""

    loss: float | None
    """Mean token loss of the global batch (None off the last pipeline stage)."""
    grad_norm: float | None
    """Gradient norm before clipping (None when the step was skipped)."""
    skipped: bool
    """True when fp16 loss scaling found inf/nan and skipped the update."""


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(token-loss sum, token count, report) - Megatron's per-token loss contract."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    report = torch.cat([loss.detach().view(1), tokens.view(1).float()])
    return loss, tokens, {"lm loss": report}


def make_forward_step(device: torch.device):
    """The forward step the schedules call once per micro batch."""

    def forward_step(data_iterator: Iterator, model):
        batch = to_device(next(data_iterator), device)
        output = model(
            batch["tokens"],
            batch["position_ids"],
            batch.get("attention_mask"),
            labels=batch["labels"],
        )
        return output, partial(_loss_func, batch["loss_mask"])

    return forward_step


def _run_schedule(args, model, iterators, device, forward_only: bool) -> torch.Tensor | None:
    """Forward (and backward) over one global batch; the summed (loss, tokens) on the last stage."""
    outputs = get_forward_backward_func()(
        forward_step_func=make_forward_step(device),
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=args.global_batch_size // (args.micro_batch_size * args.data_parallel_size),
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=forward_only,
    )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.stack([out["lm loss"] for out in outputs]).sum(dim=0)
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return total


def _mean(total: torch.Tensor | None) -> float | None:
    return None if total is None else (total[0] / total[1].clamp(min=1)).item()


def train_step(args: argparse.Namespace, model: list, optimizer, scheduler, iterators, device) -> StepResult:
    """Zero grads, forward/backward all micro batches, optimizer step, LR schedule step."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    total = _run_schedule(args, model, iterators, device, forward_only=False)
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=args.global_batch_size)
    return StepResult(loss=_mean(total), grad_norm=grad_norm, skipped=not updated)


def evaluate(args: argparse.Namespace, model: list, iterators, device) -> float | None:
    """Mean validation token loss over --eval-iters global batches (last pipeline stage only)."""
    for chunk in model:
        chunk.eval()
    totals = []
    with torch.no_grad():
        for _ in range(args.eval_iters):
            totals.append(_run_schedule(args, model, iterators, device, forward_only=True))
    for chunk in model:
        chunk.train()
    return None if totals[0] is None else _mean(torch.stack(totals).sum(dim=0))
