"""A small step-time model that orders trials and decides when to stop.

Step time of a candidate = k0·compute + k1·overhead + k2·tensor/context-parallel communication
+ k3·data-parallel gradient sync + k4·pipeline point-to-point + k5·expert-parallel token exchange, each
term in seconds on a reference device (`DeviceProfile`), all but the gradient sync and point-to-point
stretched by the pipeline bubble ((m + (pp-1)/v) micro batch slots for m micro batches).

MoE (assumed, not measured): routing is balanced, so a rank's expert FLOPs are top-k × its tokens ×
one expert's MLP whatever ep is (ep moves tokens, it does not divide work); ep pays four token exchanges
per MoE layer and micro batch (dispatch and combine, forward and backward; six with full recompute):
an all-to-all of the top-k routed copies ((ep-1)/ep of them leave the rank) with the alltoall
dispatcher, an all-gather / reduce-scatter of every token over the ep ranks with allgather; ep gains
fewer local experts (a fixed cost per expert per micro batch) and a gradient sync of the expert
parameters over world / (ep × etp × pp) ranks instead of dp × cp.

The k's start at 1 (the prior) and are refitted to the measured trials (least squares in log time,
pulled towards the prior), with a free overall scale; what the fit cannot explain is carried over from
the most similar measured trial (`Predictor.predict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flagscale.auto_tuner.memory import (
    active_layer_params,
    optimizer_bytes,
    stage_layer_ids,
    stage_layers,
    stage_param_split,
)
from flagscale.auto_tuner.space import Candidate, expert_data_parallel
from flagscale.auto_tuner.workload import Workload


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    """Rough speeds of one process's device and links (only ratios between terms matter)."""

    flops: float
    """Sustained FLOP/s of one process."""
    layer_overhead_s: float
    """Fixed cost per layer per micro batch (kernel launches, Python), forward + backward."""
    microbatch_overhead_s: float
    """Fixed cost per micro batch (data, schedule, loss)."""
    link_bytes_per_s: float
    """Collective bandwidth between the processes of a job."""
    link_latency_s: float
    """Latency of one collective or point-to-point message."""
    expert_overhead_s: float = 0.0
    """Fixed cost per local expert per MoE layer per micro batch, forward + backward (one MLP call each)."""


PROFILES = {
    "gpu": DeviceProfile(flops=150e12, layer_overhead_s=2e-4, microbatch_overhead_s=1e-3,
                         link_bytes_per_s=100e9, link_latency_s=2e-5, expert_overhead_s=5e-5),
    "cpu": DeviceProfile(flops=10e9, layer_overhead_s=3e-3, microbatch_overhead_s=3e-3,
                         link_bytes_per_s=1e9, link_latency_s=3e-4, expert_overhead_s=5e-4),
}
TERMS = ("compute", "overhead", "tp_comm", "dp_comm", "pp_comm", "ep_comm")


def _slots(c: Candidate, w: Workload) -> float:
    """Micro batch slots one step takes on a pipeline (m plus the bubble)."""
    return c.num_microbatches(w.global_batch_size) + (c.pp - 1) / c.vpp_size(w.num_layers)


def _stage_flops(c: Candidate, w: Workload, stage: int) -> float:
    """Forward + backward (+ recompute) FLOPs of one micro batch on one process of `stage`."""
    tokens = w.seq_length * c.mbs
    attention_fwd = 4 * tokens * w.seq_length * w.num_attention_heads * w.kv_channels
    moe = w.moe_layers()
    flops = 0.0
    for layer in stage_layer_ids(w, c.pp, c.vpp_size(w.num_layers), stage):
        layer_fwd = 2 * tokens * active_layer_params(w, moe[layer])  # with experts: top-k experts per token
        flops += 3 * (layer_fwd + attention_fwd)
        if c.recompute == "full":
            flops += layer_fwd + attention_fwd
        elif c.recompute == "selective":
            flops += attention_fwd
    if stage == c.pp - 1:
        flops += 3 * 2 * tokens * w.hidden_size * w.padded_vocab(c.tp)
    return flops / (c.tp * c.cp)


def _collective(p: DeviceProfile, nbytes: float, ranks: int) -> float:
    """Seconds of one ring all-reduce of `nbytes` over `ranks` processes."""
    return 0.0 if ranks == 1 else p.link_latency_s + 2 * (ranks - 1) / ranks * nbytes / p.link_bytes_per_s


def _stage_moe_layers(c: Candidate, w: Workload) -> int:
    """MoE layers on the busiest pipeline stage."""
    moe, v = w.moe_layers(), c.vpp_size(w.num_layers)
    return max(sum(moe[i] for i in stage_layer_ids(w, c.pp, v, s)) for s in range(c.pp))


def _ep_exchange(c: Candidate, w: Workload, p: DeviceProfile) -> float:
    """Seconds of one token exchange (dispatch or combine) of one MoE layer over the ep ranks."""
    if c.ep == 1:
        return 0.0
    tokens = w.seq_length // c.cp * c.mbs / (c.tp if c.sp else 1)
    token_bytes = tokens * w.hidden_size * w.element_bytes
    if w.moe_token_dispatcher_type == "alltoall":
        return p.link_latency_s + w.moe_router_topk * token_bytes * (c.ep - 1) / c.ep / p.link_bytes_per_s
    return p.link_latency_s + token_bytes * (c.ep - 1) / p.link_bytes_per_s  # all-gather / reduce-scatter


def _dp_comm(c: Candidate, w: Workload, p: DeviceProfile) -> float:
    """Gradient sync (+ parameter all-gather with the distributed optimizer): dense parameters over dp × cp,
    expert parameters over the expert data parallel ranks."""
    weight, grad, _ = optimizer_bytes(c, w)
    per_param = grad + (weight if c.dist_opt else 0)
    splits = [stage_param_split(c, w, s) for s in {0, c.pp - 1}]
    dense, expert = max(d for d, _ in splits), max(e for _, e in splits)
    return (_collective(p, dense * per_param / 2, c.dp * c.cp)
            + _collective(p, expert * per_param / 2, expert_data_parallel(c, w)))


def terms(c: Candidate, w: Workload, p: DeviceProfile) -> tuple[float, ...]:
    """The six step-time terms (seconds on the profile's device) of candidate `c`."""
    slots, layers = _slots(c, w), max(stage_layers(w, c.pp))
    compute = slots * max(_stage_flops(c, w, s) for s in {0, c.pp - 1}) / p.flops
    recompute = 4 / 3 if c.recompute == "full" else 1.0
    moe_layers = _stage_moe_layers(c, w)
    experts = moe_layers * (w.num_experts or 0) / c.ep * p.expert_overhead_s
    overhead = slots * ((layers * p.layer_overhead_s + experts) * recompute + p.microbatch_overhead_s)
    act_bytes = w.seq_length // c.cp * c.mbs * w.hidden_size * w.element_bytes
    per_layer = (6 if c.recompute == "full" else 4) * _collective(p, act_bytes, c.tp)
    kv_bytes = act_bytes * w.num_query_groups * w.kv_channels / w.hidden_size
    per_layer += 2 * _collective(p, kv_bytes, c.cp)
    tp_comm = slots * (layers * per_layer + 2 * _collective(p, act_bytes, c.tp))
    hops = c.num_microbatches(w.global_batch_size) * c.vpp_size(w.num_layers) * 2
    pp_comm = 0.0 if c.pp == 1 else hops * (p.link_latency_s + act_bytes / p.link_bytes_per_s)
    exchanges = 6 if c.recompute == "full" else 4
    ep_comm = slots * moe_layers * exchanges * _ep_exchange(c, w, p)
    return compute, overhead, tp_comm, _dp_comm(c, w, p), pp_comm, ep_comm


def distance(a: Candidate, b: Candidate) -> float:
    """How different two strategies are (0: the same): layout dims count 1, tuning knobs less."""
    layout = sum(x != y for x, y in ((a.tp, b.tp), (a.pp, b.pp), (a.cp, b.cp), (a.ep, b.ep)))
    same_recompute = (a.recompute, a.recompute_method, a.recompute_layers) == (
        b.recompute, b.recompute_method, b.recompute_layers)
    knobs = 0.5 * abs(math.log2(a.mbs / b.mbs)) + (0.0 if same_recompute else 1.0)
    knobs += 0.5 * ((a.sp != b.sp) + (a.dist_opt != b.dist_opt) + (a.vpp_layers != b.vpp_layers))
    return layout + knobs


class Predictor:
    """Step-time predictions, refitted to the trials measured so far."""

    def __init__(self, w: Workload, profile: DeviceProfile, prior_weight: float = 1.0) -> None:
        self.w, self.profile, self.prior_weight = w, profile, prior_weight
        self.log_k = [0.0] * len(TERMS)
        self.log_scale = 0.0
        self.measured: dict[Candidate, float] = {}
        self._terms: dict[Candidate, tuple[float, ...]] = {}

    def _t(self, c: Candidate) -> tuple[float, ...]:
        if c not in self._terms:
            self._terms[c] = terms(c, self.w, self.profile)
        return self._terms[c]

    def model_time(self, c: Candidate) -> float:
        """The fitted model's step time (seconds), before the neighbour correction."""
        total = sum(math.exp(k) * t for k, t in zip(self.log_k, self._t(c)))
        return math.exp(self.log_scale) * max(total, 1e-12)

    def fit(self, measured: dict[Candidate, float], steps: int = 400, rate: float = 0.2) -> None:
        """Fit scale and k's to measured step times (seconds) by gradient descent in log space."""
        self.measured = dict(measured)
        if not measured:
            return
        logs = {c: math.log(t) for c, t in measured.items()}
        self.log_scale = sum(logs[c] - math.log(self.model_time(c)) for c in logs) / len(logs) + self.log_scale
        for _ in range(steps):
            grad_k = [self.prior_weight * 2 * k for k in self.log_k]
            grad_s = 0.0
            for c, target in logs.items():
                parts = [math.exp(k) * t for k, t in zip(self.log_k, self._t(c))]
                total = max(sum(parts), 1e-12)
                err = self.log_scale + math.log(total) - target
                grad_s += 2 * err
                for i, part in enumerate(parts):
                    grad_k[i] += 2 * err * part / total
            self.log_scale -= rate * grad_s / len(logs)
            self.log_k = [k - rate * g / len(logs) for k, g in zip(self.log_k, grad_k)]

    def predict(self, c: Candidate) -> float:
        """Predicted step time (seconds): the fitted model times the residual of similar measured trials."""
        if c in self.measured:
            return self.measured[c]
        if not self.measured:
            return self.model_time(c)
        weights, log_residual = 0.0, 0.0
        for other, seconds in self.measured.items():
            weight = math.exp(-2 * distance(c, other))
            weights += weight
            log_residual += weight * math.log(seconds / self.model_time(other))
        return self.model_time(c) * math.exp(log_residual / weights)
