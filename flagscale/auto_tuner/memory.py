"""Memory estimate per process, per pipeline stage, in the spirit of Megatron-LM's theoretical
memory report (megatron/training/theoretical_memory_usage.py) and of Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", Table 2), but counted tensor by
tensor so it follows this training program's choices:

- static: weights + gradient buffer + optimizer state (master weights, Adam moments), by precision;
  the distributed optimizer divides the optimizer part by dp × cp.
- activations: what one micro batch keeps per layer (norm inputs/outputs, the QKV projection,
  rotated query/key, attention probabilities unless selective recompute, the context, MLP
  intermediates, dropout masks only when dropout > 0; see `layer_activations`), with the
  non-tensor-parallel parts divided by tp only under sequence parallelism; full recompute keeps a
  layer's (or a chunk's) input only. Multiplied by the micro batches in flight on the stage
  (1F1B: min(pp - stage, m); interleaved: Megatron's warm-up count), plus one layer's working set
  for the backward pass and, on the last stage, the fp32 logits of the loss.
- peak = static + max(activations, optimizer-step temporaries) + baseline (what the estimate does
  not model: CUDA context / allocator slack on GPU, the interpreter and libraries on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from flagscale.auto_tuner.space import Candidate
from flagscale.auto_tuner.workload import Workload

MB = 2**20


@dataclass(frozen=True, slots=True, kw_only=True)
class StageMemory:
    """Bytes on one process of one pipeline stage."""

    stage: int
    params: float
    grads: float
    optimizer: float
    activations: float
    transient: float
    """Optimizer-step temporaries (activations are gone by then)."""

    @property
    def total(self) -> float:
        """Peak bytes of the stage (without the baseline)."""
        return self.params + self.grads + self.optimizer + max(self.activations, self.transient)


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryEstimate:
    """A candidate's estimate: every stage, and the baseline added to each."""

    stages: tuple[StageMemory, ...]
    baseline_mb: float = 0.0

    @property
    def peak_mb(self) -> float:
        """The most loaded process, baseline included (what must fit the device)."""
        return max(s.total for s in self.stages) / MB + self.baseline_mb

    def stage_mb(self, stage: int) -> float:
        """One stage's peak, baseline included (stage -1: the last, which reports metrics)."""
        return self.stages[stage].total / MB + self.baseline_mb


def stage_layers(w: Workload, pp: int) -> list[int]:
    """Transformer layers on each pipeline stage (even split, or the declared uneven one)."""
    first, last = w.first_stage_layers, w.last_stage_layers
    if pp == 1 or (first is None and last is None):
        return [w.num_layers // pp] * pp
    middle_stages = pp - (first is not None) - (last is not None)
    middle = w.num_layers - (first or 0) - (last or 0)
    each = middle // middle_stages if middle_stages else 0
    counts = [each] * pp
    counts[0] = first if first is not None else each
    counts[-1] = last if last is not None else each
    return counts


def layer_params(w: Workload, tp: int, ep: int = 1) -> float:
    """Parameters of one transformer layer on one tensor parallel rank."""
    h, q, kv = w.hidden_size, w.num_attention_heads * w.kv_channels, w.num_query_groups * w.kv_channels
    fc1 = w.ffn_hidden_size * (2 if w.swiglu else 1)
    experts = (w.num_experts or 1) / (ep if w.num_experts else 1)
    split = h * (q + 2 * kv) + q * h + experts * (h * fc1 + w.ffn_hidden_size * h)
    replicated = 2 * h * (2 if w.layernorm else 1)
    if w.add_bias:
        split += q + 2 * kv + experts * fc1
        replicated += h + experts * h
    return split / tp + replicated


def stage_params(c: Candidate, w: Workload, stage: int) -> float:
    """Parameters held by one process of `stage` (embedding on the first, output layer on the last)."""
    h, vocab = w.hidden_size, w.padded_vocab(c.tp)
    count = stage_layers(w, c.pp)[stage] * layer_params(w, c.tp, c.ep)
    if stage == 0:
        count += vocab * h / c.tp + (w.max_position_embeddings * h if w.learned_positions else 0)
    if stage == c.pp - 1:
        count += h * (2 if w.layernorm else 1)
        if w.untie_embeddings or c.pp > 1:  # tied weights: the last stage keeps its own copy
            count += vocab * h / c.tp
    return count


def optimizer_bytes(c: Candidate, w: Workload) -> tuple[int, int, float]:
    """(weight, gradient, optimizer) bytes per parameter on one process."""
    weight = w.element_bytes
    grad = 4 if (w.precision == "fp32" or w.grads_in_fp32) else 2
    states = 8 if w.optimizer == "adam" else 4
    master = 0 if w.precision == "fp32" else 4 + (0 if grad == 4 else 4)  # fp32 copy (+ fp32 grad copy)
    shards = c.dp * c.cp if c.dist_opt else 1
    return weight, grad, (states + master) / shards


def layer_activations(c: Candidate, w: Workload, recomputed: bool) -> float:
    """Bytes one micro batch keeps for one layer's backward (its input only, when recomputed).

    Counted as Megatron-Core's local layer spec keeps them (checked with saved-tensor hooks): each norm
    keeps its input, its normalised value (RMSNorm) and its output (the next linear's input); the fused
    QKV output stays whole (the value tensor is a view of it) next to the rotated query and key; the
    attention probabilities; the context; SwiGLU's fc1 output, SiLU output and their product."""
    e, t = w.element_bytes, c.tp
    sb = w.seq_length // c.cp * c.mbs
    rep = 1 / t if c.sp else 1  # norm/dropout regions: split only under sequence parallelism
    h, q, kv = w.hidden_size, w.num_attention_heads * w.kv_channels, w.num_query_groups * w.kv_channels
    if recomputed:
        return sb * h * e * rep
    norm = (2 if w.layernorm else 3) * sb * h * e * rep
    masks = 2 * sb * h * rep if w.hidden_dropout > 0 else 0
    attention = sb * e / t * ((q + 2 * kv) + (q + kv if w.rope else 0) + q)  # QKV out, rotated q/k, context
    if c.recompute != "selective":
        probs = (w.num_attention_heads / t) * (w.seq_length / c.cp) * w.seq_length * c.mbs  # softmax output
        attention += probs * (e + ((1 + e) if w.attention_dropout > 0 else 0))  # + dropout mask and output
    mlp = sb * w.ffn_hidden_size * e / t * (4 if w.swiglu else 2)
    return 2 * norm + attention + mlp + masks


def chunk_activations(c: Candidate, w: Workload, layers: int) -> tuple[float, float]:
    """(kept per micro batch, working set once) for a model chunk of `layers` layers."""
    full = layer_activations(c, w, recomputed=False)
    if c.recompute != "full":
        return layers * full, full
    n = c.recompute_layers or 1
    if c.recompute_method == "block":
        kept = min(n, layers) * layer_activations(c, w, True) + max(layers - n, 0) * full
        return kept, full
    chunks = -(-layers // n)
    return chunks * layer_activations(c, w, True), min(n, layers) * full


def in_flight(c: Candidate, w: Workload, stage: int) -> int:
    """Model-chunk micro batches whose activations a stage holds at once (1F1B / interleaved warm-up)."""
    m, v = c.num_microbatches(w.global_batch_size), c.vpp_size(w.num_layers)
    if v == 1:
        return min(c.pp - stage, m)
    return min((c.pp - stage - 1) * 2 + (v - 1) * c.pp + 1, m * v)


def stage_activations(c: Candidate, w: Workload, stage: int) -> float:
    """Activation bytes at the stage's peak."""
    v = c.vpp_size(w.num_layers)
    layers = stage_layers(w, c.pp)[stage] // v
    kept, working = chunk_activations(c, w, layers)
    total = in_flight(c, w, stage) * kept + working
    sbh = w.seq_length // c.cp * c.mbs * w.hidden_size * w.element_bytes
    if stage == 0:
        total += min(c.pp, c.num_microbatches(w.global_batch_size)) * (sbh + 32 * w.seq_length * c.mbs)
    if stage == c.pp - 1:
        logits = w.seq_length // c.cp * c.mbs * w.padded_vocab(c.tp) / c.tp * 4
        total += (2 if w.layernorm else 3) * sbh + 2 * logits  # final norm, fp32 logits and their softmax
    return total


def estimate(c: Candidate, w: Workload, baseline_mb: float = 0.0) -> MemoryEstimate:
    """Every stage's memory for candidate `c`."""
    weight, grad, opt = optimizer_bytes(c, w)
    stages = []
    for stage in range(c.pp):
        params = stage_params(c, w, stage)
        stages.append(StageMemory(
            stage=stage, params=params * weight, grads=params * grad, optimizer=params * opt,
            activations=stage_activations(c, w, stage), transient=params * 4,
        ))
    return MemoryEstimate(stages=tuple(stages), baseline_mb=baseline_mb)
