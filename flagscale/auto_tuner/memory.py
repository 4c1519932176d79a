"""Memory estimate per process, per pipeline stage, in the spirit of Megatron-LM's theoretical
memory report and of Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", Table 2), but counted tensor by
tensor so it follows this training program's choices:

- static: weights + gradient buffer + optimizer state (master weights, Adam moments), by precision;
  the distributed optimizer divides the optimizer part by dp × cp (expert parameters: by the expert
  data parallel size world / (ep × etp × pp)).
- MoE layers (per `moe_layer_freq`): the router and shared experts as dense parameters, the routed
  experts num_experts / ep per rank, each split over etp (`moe_params`); their activations are the
  routed tokens' (top-k × tokens, `moe_activations`).
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

from flagscale.auto_tuner.space import Candidate, expert_data_parallel
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


def stage_layer_ids(w: Workload, pp: int, vpp: int, stage: int) -> list[int]:
    """Indices of the layers one process of `stage` holds (interleaved: chunks stage, stage + pp, ...)."""
    counts = stage_layers(w, pp)
    if vpp > 1 and len(set(counts)) == 1:
        per_chunk = counts[0] // vpp
        return [(chunk * pp + stage) * per_chunk + i for chunk in range(vpp) for i in range(per_chunk)]
    first = sum(counts[:stage])
    return list(range(first, first + counts[stage]))


def attention_params(w: Workload, tp: int) -> float:
    """Attention and both norms of one layer on one tensor parallel rank (norms and the proj bias whole)."""
    h, q, kv = w.hidden_size, w.num_attention_heads * w.kv_channels, w.num_query_groups * w.kv_channels
    split = h * (q + 2 * kv) + q * h + (q + 2 * kv if w.add_bias else 0)
    replicated = 2 * h * (2 if w.layernorm else 1) + (h if w.add_bias else 0)
    replicated += 2 * w.kv_channels * (2 if w.layernorm else 1) if w.qk_layernorm else 0
    return split / tp + replicated


def mlp_params(w: Workload, width: int, tp: int) -> float:
    """One MLP of hidden width `width` (fc1 gated under SwiGLU) on one of `tp` ranks (fc2's bias whole)."""
    h, fc1 = w.hidden_size, width * (2 if w.swiglu else 1)
    split = h * fc1 + width * h + (fc1 if w.add_bias else 0)
    return split / tp + (h if w.add_bias else 0)


def moe_params(w: Workload, tp: int, ep: int) -> tuple[float, float]:
    """(dense, expert) parameters of one MoE layer's MLP part on one rank: the router (whole) and the shared
    experts (split over tp) are dense; the routed experts are num_experts / ep per rank, split over etp."""
    experts, h = w.num_experts or 0, w.hidden_size
    dense = experts * h + (experts if w.add_bias else 0)
    if w.moe_shared_expert_intermediate_size:
        dense += mlp_params(w, w.moe_shared_expert_intermediate_size, tp) + (h if w.moe_shared_expert_gate else 0)
    expert = experts / ep * mlp_params(w, w.moe_ffn_hidden_size or w.ffn_hidden_size, w.expert_tp(tp))
    return dense, expert


def layer_params(w: Workload, tp: int, ep: int = 1, moe: bool = False) -> tuple[float, float]:
    """(dense, expert) parameters of one transformer layer on one rank."""
    if not moe:
        return attention_params(w, tp) + mlp_params(w, w.ffn_hidden_size, tp), 0.0
    dense, expert = moe_params(w, tp, ep)
    return attention_params(w, tp) + dense, expert


def active_layer_params(w: Workload, moe: bool) -> float:
    """Parameters one token passes through in one layer (unsplit): top-k experts, not all of them."""
    if not moe:
        return sum(layer_params(w, 1))
    dense, _ = layer_params(w, 1, moe=True)
    return dense + w.moe_router_topk * mlp_params(w, w.moe_ffn_hidden_size or w.ffn_hidden_size, 1)


def stage_param_split(c: Candidate, w: Workload, stage: int) -> tuple[float, float]:
    """(dense, expert) parameters held by one process of `stage` (embedding on the first, output on the last)."""
    moe = w.moe_layers()
    dense = expert = 0.0
    for layer in stage_layer_ids(w, c.pp, c.vpp_size(w.num_layers), stage):
        d, e = layer_params(w, c.tp, c.ep, moe[layer])
        dense, expert = dense + d, expert + e
    h, vocab = w.hidden_size, w.padded_vocab(c.tp)
    if stage == 0:
        dense += vocab * h / c.tp + (w.max_position_embeddings * h if w.learned_positions else 0)
    if stage == c.pp - 1:
        dense += h * (2 if w.layernorm else 1)
        if w.untie_embeddings or c.pp > 1:  # tied weights: the last stage keeps its own copy
            dense += vocab * h / c.tp
    return dense, expert


def stage_params(c: Candidate, w: Workload, stage: int) -> float:
    """Parameters held by one process of `stage`, dense and expert together."""
    return sum(stage_param_split(c, w, stage))


def optimizer_bytes(c: Candidate, w: Workload, expert: bool = False) -> tuple[int, int, float]:
    """(weight, gradient, optimizer) bytes per parameter on one process; the distributed optimizer shards
    dense parameters over dp × cp and expert parameters over the expert data parallel group."""
    weight = w.element_bytes
    grad = 4 if (w.precision == "fp32" or w.grads_in_fp32) else 2
    states = 8 if w.optimizer == "adam" else 4
    master = 0 if w.precision == "fp32" else 4 + (0 if grad == 4 else 4)  # fp32 copy (+ fp32 grad copy)
    shards = (expert_data_parallel(c, w) if expert else c.dp * c.cp) if c.dist_opt else 1
    return weight, grad, (states + master) / shards


def layer_activations(c: Candidate, w: Workload, recomputed: bool, moe: bool = False) -> float:
    """Bytes one micro batch keeps for one layer's backward (its input only, when recomputed).

    Counted as Megatron-Core's local layer spec keeps them (checked with saved-tensor hooks): each norm
    keeps its input, its normalised value (RMSNorm) and its output (the next linear's input); the fused
    QKV output stays whole (the value tensor is a view of it) next to the rotated query and key; the
    attention probabilities; the context; SwiGLU's fc1 output, SiLU output and their product (an MoE
    layer: see `moe_activations`)."""
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
    mlp = moe_activations(c, w) if moe else sb * w.ffn_hidden_size * e / t * (4 if w.swiglu else 2)
    return 2 * norm + attention + mlp + masks


def moe_activations(c: Candidate, w: Workload) -> float:
    """What one micro batch keeps in an MoE layer's MLP part on one rank, assuming balanced routing (each
    rank's experts receive as many routed tokens as its tokens send): top-k × tokens routed rows, gathered
    over the expert tensor parallel ranks (etp / tp of the tp group's tokens), each keeping its permuted
    input, the expert output (for the routing-weight gradient) and the fc1 intermediates (split over etp);
    the fp32 router logits and probabilities; the shared experts as a dense MLP."""
    e, t, etp = w.element_bytes, c.tp, w.expert_tp(c.tp)
    sb = w.seq_length // c.cp * c.mbs
    gated = 4 if w.swiglu else 2
    rows = w.moe_router_topk * sb * etp / t
    width = w.moe_ffn_hidden_size or w.ffn_hidden_size
    routed = rows * e * (2 * w.hidden_size + width / etp * gated)
    router = 2 * sb * (1 / t if c.sp else 1) * (w.num_experts or 0) * 4
    shared = sb * (w.moe_shared_expert_intermediate_size or 0) * e / t * gated
    return routed + router + shared


def chunk_activations(c: Candidate, w: Workload, moe: list[bool]) -> tuple[float, float]:
    """(kept per micro batch, working set once) for a model chunk whose layers are MoE or dense as `moe` says."""
    full = [layer_activations(c, w, False, m) for m in moe]
    if c.recompute != "full" or not moe:
        return sum(full), max(full, default=0.0)
    n, kept_input = c.recompute_layers or 1, layer_activations(c, w, True)
    if c.recompute_method == "block":
        return min(n, len(moe)) * kept_input + sum(full[n:]), max(full)
    groups = [full[i:i + n] for i in range(0, len(full), n)]
    return len(groups) * kept_input, max(sum(g) for g in groups)


def stage_chunks(c: Candidate, w: Workload, stage: int) -> list[list[bool]]:
    """MoE flags of the layers of each model chunk the stage holds (one chunk without interleaving)."""
    v, moe = c.vpp_size(w.num_layers), w.moe_layers()
    ids = stage_layer_ids(w, c.pp, v, stage)
    size = max(1, len(ids) // v)
    return [[moe[i] for i in ids[k:k + size]] for k in range(0, len(ids), size)] or [[]]


def in_flight(c: Candidate, w: Workload, stage: int) -> int:
    """Model-chunk micro batches whose activations a stage holds at once (1F1B / interleaved warm-up)."""
    m, v = c.num_microbatches(w.global_batch_size), c.vpp_size(w.num_layers)
    if v == 1:
        return min(c.pp - stage, m)
    return min((c.pp - stage - 1) * 2 + (v - 1) * c.pp + 1, m * v)


def stage_activations(c: Candidate, w: Workload, stage: int) -> float:
    """Activation bytes at the stage's peak."""
    kept, working = max(chunk_activations(c, w, chunk) for chunk in stage_chunks(c, w, stage))
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
    expert_opt = optimizer_bytes(c, w, expert=True)[2]
    stages = []
    for stage in range(c.pp):
        dense, expert = stage_param_split(c, w, stage)
        params = dense + expert
        stages.append(StageMemory(
            stage=stage, params=params * weight, grads=params * grad, optimizer=dense * opt + expert * expert_opt,
            activations=stage_activations(c, w, stage), transient=params * 4,
        ))
    return MemoryEstimate(stages=tuple(stages), baseline_mb=baseline_mb)
