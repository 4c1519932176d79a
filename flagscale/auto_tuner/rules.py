"""Validity rules: the divisibility and compatibility checks Megatron enforces at start-up, applied
before a trial is spent on a candidate. One small function per rule; each returns None when the
candidate passes, else the reason (shown in the summary). `check` runs them all."""

from __future__ import annotations

from collections.abc import Callable

from flagscale.auto_tuner.space import Candidate
from flagscale.auto_tuner.workload import Workload

Rule = Callable[[Candidate, Workload], str | None]


def world_size(c: Candidate, w: Workload) -> str | None:
    """world size = dp × tp × pp × cp."""
    if c.dp * c.tp * c.pp * c.cp != w.world_size:
        return f"dp×tp×pp×cp = {c.dp * c.tp * c.pp * c.cp} is not the world size {w.world_size}"
    return None


def heads_divisible_by_tp(c: Candidate, w: Workload) -> str | None:
    """Attention heads and query groups are split over tensor parallel ranks."""
    if w.num_attention_heads % c.tp or w.num_query_groups % c.tp:
        return (f"attention heads ({w.num_attention_heads}) / query groups ({w.num_query_groups}) "
                f"not divisible by tp {c.tp}")
    return None


def hidden_divisible_by_tp(c: Candidate, w: Workload) -> str | None:
    """Hidden and FFN sizes are split over tensor parallel ranks."""
    if w.hidden_size % c.tp or w.ffn_hidden_size % c.tp:
        return f"hidden ({w.hidden_size}) / ffn hidden ({w.ffn_hidden_size}) not divisible by tp {c.tp}"
    return None


def batch_divisible(c: Candidate, w: Workload) -> str | None:
    """global batch = micro batch × dp × number of micro batches."""
    if w.global_batch_size % (c.dp * c.mbs):
        return f"global batch {w.global_batch_size} not divisible by dp×mbs = {c.dp * c.mbs}"
    return None


def layers_divisible_by_pp(c: Candidate, w: Workload) -> str | None:
    """Every pipeline stage gets the same number of layers, unless an uneven split is declared."""
    first, last = w.first_stage_layers, w.last_stage_layers
    if c.pp > w.num_layers:
        return f"pp {c.pp} is larger than num_layers {w.num_layers}"
    if first is None and last is None:
        return None if w.num_layers % c.pp == 0 else f"num_layers {w.num_layers} not divisible by pp {c.pp}"
    if c.pp == 1:
        return "an uneven pipeline split (decoder_first/last_pipeline_num_layers) needs pp > 1"
    middle = w.num_layers - (first or 0) - (last or 0)
    stages = c.pp - (first is not None) - (last is not None)
    if (stages == 0 and middle != 0) or (stages > 0 and (middle <= 0 or middle % stages)):
        return f"the uneven split leaves {middle} layers for {stages} middle stage(s) of pp {c.pp}"
    return None


def sequence_parallel(c: Candidate, w: Workload) -> str | None:
    """Sequence parallelism splits along tensor parallel ranks (needs tp > 1) and CUDA LayerNorm."""
    if c.sp and c.tp == 1:
        return "sequence parallel needs tp > 1"
    if c.sp and w.device == "cpu":
        return "sequence parallel needs CUDA"
    return None


def context_parallel(c: Candidate, w: Workload) -> str | None:
    """Context parallelism splits the sequence into 2×cp chunks and needs TransformerEngine."""
    if c.cp == 1:
        return None
    if w.seq_length % (2 * c.cp):
        return f"seq_length {w.seq_length} not divisible by 2×cp = {2 * c.cp}"
    if w.device == "cpu":
        return "context parallel needs CUDA (TransformerEngine attention)"
    return None


def virtual_pipeline(c: Candidate, w: Workload) -> str | None:
    """Interleaving needs pp > 1, whole layers per chunk, >= 2 chunks, and micro batches in multiples of pp."""
    if not c.vpp_layers:
        return None
    if c.pp == 1:
        return "virtual pipeline stages need pp > 1"
    per_stage = w.num_layers // c.pp
    if w.num_layers % c.pp or per_stage % c.vpp_layers:
        return f"layers per stage ({per_stage}) not divisible by num_layers_per_virtual_pipeline_stage {c.vpp_layers}"
    if per_stage // c.vpp_layers < 2:
        return f"{c.vpp_layers} layers per virtual stage leaves one chunk per rank (no interleaving)"
    if c.num_microbatches(w.global_batch_size) % c.pp:
        return f"interleaving needs micro batches ({c.num_microbatches(w.global_batch_size)}) divisible by pp {c.pp}"
    return None


def recompute(c: Candidate, w: Workload) -> str | None:
    """Full recompute needs a method and a layer count that fits one model chunk."""
    if c.recompute != "full":
        return None
    if c.recompute_method is None or not c.recompute_layers:
        return "full recompute needs recompute_method and recompute_num_layers"
    chunk_layers = w.num_layers // c.pp // c.vpp_size(w.num_layers)
    if c.recompute_layers > chunk_layers:
        return f"recompute_num_layers {c.recompute_layers} exceeds the {chunk_layers} layers of a model chunk"
    return None


def distributed_optimizer(c: Candidate, w: Workload) -> str | None:
    """With dp = 1 the distributed optimizer shards nothing: the same strategy as without it."""
    if c.dist_opt and c.dp * c.cp == 1:
        return "distributed optimizer with dp = 1 is the same as without it"
    return None


def expert_parallel(c: Candidate, w: Workload) -> str | None:
    """Experts are split over ep ranks taken from the data (and context) parallel ranks."""
    if c.ep == 1:
        return None
    if not w.num_experts:
        return "expert parallel needs a model with experts"
    if w.num_experts % c.ep or (c.dp * c.cp) % c.ep:
        return f"ep {c.ep} must divide num_experts ({w.num_experts}) and dp×cp ({c.dp * c.cp})"
    return None


RULES: tuple[Rule, ...] = (
    world_size, heads_divisible_by_tp, hidden_divisible_by_tp, batch_divisible, layers_divisible_by_pp,
    sequence_parallel, context_parallel, virtual_pipeline, recompute, distributed_optimizer, expert_parallel,
)


def check(c: Candidate, w: Workload) -> list[str]:
    """Every rule the candidate breaks (empty: valid)."""
    return [reason for rule in RULES if (reason := rule(c, w)) is not None]
