"""A small step-time model that orders trials and decides when to stop.

Step time of a candidate = k0·compute + k1·overhead + k2·tensor/context-parallel communication
+ k3·data-parallel gradient sync + k4·pipeline point-to-point, each term in seconds on a reference
device (`DeviceProfile`), the first three stretched by the pipeline bubble ((m + (pp-1)/v) micro
batch slots for m micro batches). The k's start at 1 (the prior) and are refitted to the measured
trials (least squares in log time, pulled towards the prior), with a free overall scale; what the
fit cannot explain is carried over from the most similar measured trial (`Predictor.predict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flagscale.auto_tuner.memory import layer_params, optimizer_bytes, stage_layers, stage_params
from flagscale.auto_tuner.space import Candidate
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


PROFILES = {
    "gpu": DeviceProfile(flops=150e12, layer_overhead_s=2e-4, microbatch_overhead_s=1e-3,
                         link_bytes_per_s=100e9, link_latency_s=2e-5),
    "cpu": DeviceProfile(flops=10e9, layer_overhead_s=3e-3, microbatch_overhead_s=3e-3,
                         link_bytes_per_s=1e9, link_latency_s=3e-4),
}
TERMS = ("compute", "overhead", "tp_comm", "dp_comm", "pp_comm")


def _slots(c: Candidate, w: Workload) -> float:
    """Micro batch slots one step takes on a pipeline (m plus the bubble)."""
    return c.num_microbatches(w.global_batch_size) + (c.pp - 1) / c.vpp_size(w.num_layers)


def _stage_flops(c: Candidate, w: Workload, stage: int) -> float:
    """Forward + backward (+ recompute) FLOPs of one micro batch on one process of `stage`."""
    tokens = w.seq_length * c.mbs
    q = w.num_attention_heads * w.kv_channels
    layer_fwd = 2 * tokens * layer_params(w, 1, w.num_experts or 1)  # with experts: one expert's MLP per token
    attention_fwd = 4 * tokens * w.seq_length * q
    per_layer = 3 * (layer_fwd + attention_fwd)
    if c.recompute == "full":
        per_layer += layer_fwd + attention_fwd
    elif c.recompute == "selective":
        per_layer += attention_fwd
    flops = stage_layers(w, c.pp)[stage] * per_layer
    if stage == c.pp - 1:
        flops += 3 * 2 * tokens * w.hidden_size * w.padded_vocab(c.tp)
    return flops / (c.tp * c.cp)


def _collective(p: DeviceProfile, nbytes: float, ranks: int) -> float:
    """Seconds of one ring all-reduce of `nbytes` over `ranks` processes."""
    return 0.0 if ranks == 1 else p.link_latency_s + 2 * (ranks - 1) / ranks * nbytes / p.link_bytes_per_s


def terms(c: Candidate, w: Workload, p: DeviceProfile) -> tuple[float, ...]:
    """The five step-time terms (seconds on the profile's device) of candidate `c`."""
    slots, layers = _slots(c, w), max(stage_layers(w, c.pp))
    compute = slots * max(_stage_flops(c, w, s) for s in {0, c.pp - 1}) / p.flops
    recompute = 4 / 3 if c.recompute == "full" else 1.0
    overhead = slots * (layers * p.layer_overhead_s * recompute + p.microbatch_overhead_s)
    act_bytes = w.seq_length // c.cp * c.mbs * w.hidden_size * w.element_bytes
    per_layer = (6 if c.recompute == "full" else 4) * _collective(p, act_bytes, c.tp)
    kv_bytes = act_bytes * w.num_query_groups * w.kv_channels / w.hidden_size
    per_layer += 2 * _collective(p, kv_bytes, c.cp)
    tp_comm = slots * (layers * per_layer + 2 * _collective(p, act_bytes, c.tp))
    weight, grad, _ = optimizer_bytes(c, w)
    params = max(stage_params(c, w, s) for s in {0, c.pp - 1})
    dp_comm = _collective(p, params * (grad + (weight if c.dist_opt else 0)) / 2, c.dp * c.cp)
    hops = c.num_microbatches(w.global_batch_size) * c.vpp_size(w.num_layers) * 2
    pp_comm = 0.0 if c.pp == 1 else hops * (p.link_latency_s + act_bytes / p.link_bytes_per_s)
    return compute, overhead, tp_comm, dp_comm, pp_comm


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
