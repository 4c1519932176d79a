"""One training step and one evaluation, through Megatron-Core's pipeline schedules.

`get_forward_backward_func()` picks the schedule (no pipelining, 1F1B, or interleaved 1F1B);
the loss is summed per token and reported as (sum, count) so it can be averaged exactly over
micro batches and data-parallel ranks.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

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
    aux: dict[str, float | list[float]] = field(default_factory=dict)
    """MoE router losses and multi-token prediction losses (`AuxLosses.read`); empty for a dense model."""


# Megatron-Core's tracker names of the router losses, by --moe-router-load-balancing-type.
_BALANCING_LOSSES = {
    "aux_loss": "load_balancing_loss",
    "seq_aux_loss": "seq_load_balancing_loss",
    "global_aux_loss": "global_load_balancing_loss",
}


@dataclass(frozen=True, slots=True)
class AuxLosses:
    """Megatron-Core's per-layer trackers of MoE router losses and MTP losses, read once per step.

    Layers add their losses (divided by their coefficients) to the trackers in every training micro
    batch; `read` reduces them over pipeline, tensor and data parallel ranks as Megatron-LM's training
    log does, clears them, and returns means over micro batches: `moe_<name>` (over MoE layers) and
    `moe_<name>_per_layer`, `mtp_loss` (over MTP layers) and `mtp_loss_per_layer`.
    It is a collective: every rank calls it after every step.
    """

    moe_names: tuple[str, ...]
    """Tracked router losses: load-balancing losses with a coefficient > 0, z_loss when set."""
    tracked_layers: int
    """Tracker length: decoder layers + MTP layers (the router's own count)."""
    moe_layers: tuple[int, ...]
    """Tracker indices of the MoE layers (MTP layers are MoE when the last decoder layer is)."""
    mtp_layers: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AuxLosses:
        """What this model tracks."""
        mtp = args.mtp_num_layers or 0
        if not args.num_experts:
            return cls((), args.num_layers + mtp, (), mtp)
        freq, layers = args.moe_layer_freq, args.num_layers
        pattern = freq if isinstance(freq, list) else [int(i % freq == 0) for i in range(layers)]
        pattern = pattern + [pattern[-1]] * mtp
        moe_layers = tuple(i for i, is_moe in enumerate(pattern) if is_moe)
        return cls(_router_loss_names(args), layers + mtp, moe_layers, mtp)

    def read(self, num_microbatches: int, device: torch.device) -> dict[str, float | list[float]]:
        """This step's losses, reduced over ranks; the trackers start empty again."""
        values = self._moe(1 / num_microbatches, device) if self.moe_names else {}
        if self.mtp_layers:
            values.update(self._mtp(1 / num_microbatches))
        return values

    def _moe(self, scale: float, device: torch.device) -> dict[str, float | list[float]]:
        tracker = get_moe_layer_wise_logging_tracker()
        for name in self.moe_names:  # a stage without MoE layers still joins the reductions
            tracker.setdefault(name, {"values": torch.zeros(self.tracked_layers, device=device)})
        reduce_aux_losses_tracker_across_ranks(list(self.moe_names))
        values: dict[str, float | list[float]] = {}
        for name in self.moe_names:
            per_layer = (tracker[name]["values"].float() * scale).tolist()
            values[f"moe_{name}"] = sum(per_layer) / len(self.moe_layers)
            values[f"moe_{name}_per_layer"] = [per_layer[i] for i in self.moe_layers]
        clear_aux_losses_tracker()
        return values

    def _mtp(self, scale: float) -> dict[str, float | list[float]]:
        losses: dict[str, torch.Tensor] = {}
        MTPLossLoggingHelper.track_mtp_metrics(scale, 0, None, None, losses)
        if not losses:  # no MTP layer on this pipeline stage
            return {}
        per_layer = [losses[f"mtp_{i + 1} loss"].item() for i in range(self.mtp_layers)]
        return {"mtp_loss": sum(per_layer) / len(per_layer), "mtp_loss_per_layer": per_layer}


def _router_loss_names(args: argparse.Namespace) -> tuple[str, ...]:
    """Megatron-Core's tracker names of the router losses this configuration computes."""
    kinds = args.moe_router_load_balancing_type
    kinds = kinds if isinstance(kinds, list) else [kinds]
    coeffs = args.moe_aux_loss_coeff
    coeffs = coeffs if isinstance(coeffs, list) else [coeffs] * len(kinds)
    names = [_BALANCING_LOSSES[k] for k, c in zip(kinds, coeffs, strict=True) if k in _BALANCING_LOSSES and c > 0]
    if args.moe_z_loss_coeff is not None:
        names.append("z_loss")
    return tuple(names)


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
            loss_mask=batch["loss_mask"],  # multi-token prediction masks its losses with it
        )
        return output, partial(_loss_func, batch["loss_mask"])

    return forward_step


def _run_schedule(args, model, iterators, device, forward_only: bool) -> torch.Tensor | None:
    """Forward (and backward) over one global batch; the summed (loss, tokens) on the last stage."""
    outputs = get_forward_backward_func()(
        forward_step_func=make_forward_step(device),
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=num_microbatches(args),
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=forward_only,
    )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.stack([out["lm loss"] for out in outputs]).sum(dim=0)
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return total


def num_microbatches(args: argparse.Namespace) -> int:
    """Micro batches per step on each data-parallel rank."""
    return args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)


def _mean(total: torch.Tensor | None) -> float | None:
    return None if total is None else (total[0] / total[1].clamp(min=1)).item()


def train_step(
    args: argparse.Namespace, model: list, optimizer, scheduler, iterators, device, aux: AuxLosses
) -> StepResult:
    """Zero grads, forward/backward all micro batches, optimizer step, LR schedule step, aux losses.

    The MoE expert-bias update (--moe-router-enable-expert-bias) happens where Megatron-LM does it:
    in Megatron-Core's finalize_model_grads, which the schedule calls after the last backward."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    total = _run_schedule(args, model, iterators, device, forward_only=False)
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=args.global_batch_size)
    losses = aux.read(num_microbatches(args), device)
    return StepResult(loss=_mean(total), grad_norm=grad_norm, skipped=not updated, aux=losses)


def evaluate(args: argparse.Namespace, model: list, iterators, device) -> float | None:
    """Mean validation token loss over --eval-iters global batches (last pipeline stage only); None for
    --eval-iters 0 (no validation, as in Megatron-LM)."""
    if not args.eval_iters:
        return None
    for chunk in model:
        chunk.eval()
    totals = []
    with torch.no_grad():
        for _ in range(args.eval_iters):
            totals.append(_run_schedule(args, model, iterators, device, forward_only=True))
    for chunk in model:
        chunk.train()
    return None if totals[0] is None else _mean(torch.stack(totals).sum(dim=0))
