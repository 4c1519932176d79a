"""Which parallel layouts are valid: the one set of rules the training program's argument check
(`flagscale.train.arguments.validate`) and the auto-tuner's pruning (`flagscale.auto_tuner.rules`)
both apply, so a layout the tuner keeps is one the training program starts, and the reverse.

`problems(layout, model, world_size, device)` returns every rule a `Layout` (how the job is split:
tensor/pipeline/context/expert/data parallel sizes, virtual pipeline stages, micro and global
batch, sequence parallelism, distributed optimizer) breaks for a `ModelShape` (the model facts the
rules read), each as a short message naming the Megatron-LM argument names and values.

The rules are Megatron-LM's (core_v0.16.1: `validate_args`, `initialize_model_parallel`,
`TransformerConfig.__post_init__`, the tensor-parallel linear layers and the interleaved 1F1B
schedule) as this project's training program runs them, plus one of its own: context parallelism
needs TransformerEngine attention (the local layer spec is used). Sequence parallelism runs on CUDA and
on the CPU alike (the training program's CPU shims let the local spec's torch norm take it).
Where Megatron-LM only warns (sequence_parallel with tensor_model_parallel_size 1 is switched off)
the layout is valid. Two rules follow what this program runs rather than the letter of Megatron-LM:
interleaving needs pipeline_model_parallel_size > 1, not > 2 (Megatron-LM's > 2 guards batched p2p
without overlap, which this program never combines with interleaving), and num_query_groups must be
divisible by tensor_model_parallel_size (Megatron-Core 0.16 also replicates fewer groups over more
ranks; not exercised here). Torch-free: the launcher and the tuner import it on any machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

CONTEXT_PARALLEL_NEEDS_TE = (
    "context_parallel_size > 1 needs TransformerEngine attention (not used here); set it to 1"
)
DEVICES = ("auto", "cpu", "cuda")
"""`device` of `problems`: auto (CUDA when present), cpu or cuda. No rule depends on it today (sequence
parallelism, the last one that did, trains on the CPU too); callers pass what they know."""


def _known(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `values` that are fields of `cls` and set (None keeps the field's default)."""
    return {f.name: values[f.name] for f in fields(cls) if values.get(f.name) is not None}


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """How one training job is split over its processes (Megatron-LM argument names)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    """Tensor parallel size of the expert layers (Megatron's default: tensor_model_parallel_size)."""
    data_parallel_size: int | None = None
    """Derived from the world size when None; when set, dp × tp × pp × cp must be the world size."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline rank (interleaved schedule)."""
    num_layers_per_virtual_pipeline_stage: int | None = None
    """The other way to ask for interleaving: layers per model chunk."""
    micro_batch_size: int = 1
    global_batch_size: int | None = None
    """None: micro_batch_size × data parallel size (one micro batch per step)."""
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_param_gather: bool = False

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Layout:
        """From Megatron argument values (`vars(args)`, a trial's train values); other keys are ignored."""
        return cls(**_known(cls, values))

    @property
    def model_parallel_size(self) -> int:
        """Processes one model replica spans: tp × pp × cp."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    @property
    def expert_tensor_size(self) -> int:
        """expert_tensor_parallel_size, defaulting to tensor_model_parallel_size as Megatron does."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def interleaved(self) -> bool:
        """Whether the interleaved (virtual pipeline) schedule is asked for."""
        return (self.virtual_pipeline_model_parallel_size or self.num_layers_per_virtual_pipeline_stage) is not None

    def data_parallel(self, world_size: int | None) -> int | None:
        """The data parallel size: given, or world / (tp × pp × cp); None when it cannot be known."""
        if self.data_parallel_size is not None:
            return self.data_parallel_size
        if world_size is None or world_size % self.model_parallel_size:
            return None
        return world_size // self.model_parallel_size


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelShape:
    """The model facts the layout rules read; None: unknown (the rules that need it are skipped)."""

    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    """Key/value head groups; None: one per attention head."""
    ffn_hidden_size: int | None = None
    """The MLP width (its linear layers are split over tensor parallel ranks)."""
    seq_length: int | None = None
    num_experts: int | None = None
    """Experts per MoE layer; None or 0: a dense model."""
    decoder_first_pipeline_num_layers: int | None = None
    """Uneven pipeline split: layers on the first stage."""
    decoder_last_pipeline_num_layers: int | None = None
    """Uneven pipeline split: layers on the last stage."""

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> ModelShape:
        """From Megatron argument values; other keys are ignored."""
        return cls(**_known(cls, values))

    @property
    def uneven(self) -> bool:
        """Whether a first or last pipeline stage has its own layer count."""
        return self.decoder_first_pipeline_num_layers is not None or self.decoder_last_pipeline_num_layers is not None


def problems(layout: Layout, model: ModelShape, world_size: int | None = None, device: str = "auto") -> list[str]:
    """Every rule `layout` breaks for `model` on `world_size` processes (None: not known yet) on `device`
    (auto, cpu or cuda); empty when the layout is valid."""
    sizes = _size_problems(layout)
    if sizes:
        return sizes
    dp = layout.data_parallel(world_size)
    world = world_size if world_size is not None else (dp * layout.model_parallel_size if dp else None)
    found = _world_problems(layout, world_size)
    found += _expert_problems(layout, model, world)
    found += _tensor_problems(layout, model)
    found += _sequence_problems(layout, model)
    found += _context_problems(layout, model)
    stages = _pipeline_problems(layout, model) or _virtual_problems(layout, model)
    found += stages
    if dp is not None:
        found += _batch_problems(layout, dp, schedule=not stages)
    found += _optimizer_problems(layout)
    return found


def _size_problems(layout: Layout) -> list[str]:
    """Sizes that are not positive (the other rules would divide by them)."""
    names = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
             "expert_model_parallel_size", "expert_tensor_parallel_size", "data_parallel_size",
             "virtual_pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage", "micro_batch_size",
             "global_batch_size")
    values = {name: getattr(layout, name) for name in names}
    return [f"{name} ({value}) must be >= 1" for name, value in values.items() if value is not None and value < 1]


def _world_problems(layout: Layout, world_size: int | None) -> list[str]:
    """tp × pp × cp divides the world size (and × dp is the world size when dp is given)."""
    if world_size is None:
        return []
    tp, pp, cp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size, layout.context_parallel_size
    product = f"tensor_model_parallel_size ({tp}) × pipeline_model_parallel_size ({pp}) × context_parallel_size ({cp})"
    if world_size % layout.model_parallel_size:
        return [f"{product} = {layout.model_parallel_size} does not divide the world size {world_size} "
                "(nnodes × nproc_per_node)"]
    dp = layout.data_parallel_size
    if dp is not None and dp * layout.model_parallel_size != world_size:
        return [f"data_parallel_size ({dp}) × {product} = {dp * layout.model_parallel_size} is not the world size "
                f"{world_size}"]
    return []


def _expert_problems(layout: Layout, model: ModelShape, world: int | None) -> list[str]:
    """Experts are split over ep ranks; the expert layers' ep × etp × pp must divide the world size."""
    ep = layout.expert_model_parallel_size
    if ep == 1:
        return []
    if not model.num_experts:
        return [f"expert_model_parallel_size ({ep}) > 1 needs a model with experts (num_experts)"]
    found = []
    if model.num_experts % ep:
        found.append(f"num_experts ({model.num_experts}) is not divisible by expert_model_parallel_size ({ep})")
    etp, pp = layout.expert_tensor_size, layout.pipeline_model_parallel_size
    if world is not None and world % (ep * etp * pp):
        found.append(f"expert_model_parallel_size ({ep}) × expert_tensor_parallel_size ({etp}) × "
                     f"pipeline_model_parallel_size ({pp}) = {ep * etp * pp} does not divide the world size {world}")
    return found


def _tensor_problems(layout: Layout, model: ModelShape) -> list[str]:
    """Attention heads, key/value groups and the MLP width are split over tensor parallel ranks."""
    tp = layout.tensor_model_parallel_size
    values = {"num_attention_heads": model.num_attention_heads, "num_query_groups": model.num_query_groups,
              "ffn_hidden_size": model.ffn_hidden_size}
    return [f"{name} ({value}) is not divisible by tensor_model_parallel_size ({tp})"
            for name, value in values.items() if value is not None and value % tp]


def _sequence_problems(layout: Layout, model: ModelShape) -> list[str]:
    """Sequence parallelism splits each context-parallel sequence chunk over tp ranks (off with tp 1)."""
    tp, cp, seq = layout.tensor_model_parallel_size, layout.context_parallel_size, model.seq_length
    if not layout.sequence_parallel or tp == 1 or seq is None or seq % (tp * cp) == 0:
        return []
    return [f"sequence_parallel needs seq_length ({seq}) divisible by tensor_model_parallel_size ({tp})"
            + (f" × context_parallel_size ({cp})" if cp > 1 else "")]


def _context_problems(layout: Layout, model: ModelShape) -> list[str]:
    """Context parallelism: TransformerEngine attention, and a sequence in 2 × cp chunks."""
    cp, seq = layout.context_parallel_size, model.seq_length
    if cp == 1:
        return []
    found = [CONTEXT_PARALLEL_NEEDS_TE]
    if seq is not None and seq % (2 * cp):
        found.append(f"seq_length ({seq}) is not divisible by 2 × context_parallel_size (2 × {cp})")
    return found


def _pipeline_problems(layout: Layout, model: ModelShape) -> list[str]:
    """Every pipeline stage gets the same number of layers, unless an uneven first/last stage is given."""
    layers, pp = model.num_layers, layout.pipeline_model_parallel_size
    if layers is None:
        return []
    if not model.uneven:
        return [f"num_layers ({layers}) is not divisible by pipeline_model_parallel_size ({pp})"] if layers % pp else []
    first, last = model.decoder_first_pipeline_num_layers, model.decoder_last_pipeline_num_layers
    edges = {"decoder_first_pipeline_num_layers": first, "decoder_last_pipeline_num_layers": last}
    found = [f"{name} ({value}) must be >= 1" for name, value in edges.items() if value is not None and value < 1]
    middle_layers = layers - (first or 0) - (last or 0)
    middle_stages = pp - (first is not None) - (last is not None)
    split = ", ".join(f"{name} {value}" for name, value in edges.items() if value is not None)
    if middle_stages < 0 or bool(middle_layers) != bool(middle_stages) or middle_layers < 0:
        found.append(f"the uneven pipeline split ({split}) leaves {middle_layers} layers for {max(middle_stages, 0)} "
                     f"middle stage(s) of pipeline_model_parallel_size ({pp}) (num_layers {layers})")
    elif middle_stages and middle_layers % middle_stages:
        found.append(f"the uneven pipeline split ({split}) leaves {middle_layers} layers, not divisible by the "
                     f"{middle_stages} middle stage(s) of pipeline_model_parallel_size ({pp})")
    return found


def _virtual_problems(layout: Layout, model: ModelShape) -> list[str]:
    """Interleaving: one way of asking, pp > 1, and whole layers in every model chunk."""
    vpp, per_chunk = layout.virtual_pipeline_model_parallel_size, layout.num_layers_per_virtual_pipeline_stage
    if vpp is None and per_chunk is None:
        return []
    if vpp is not None and per_chunk is not None:
        return ["set only one of virtual_pipeline_model_parallel_size and num_layers_per_virtual_pipeline_stage"]
    pp = layout.pipeline_model_parallel_size
    if pp == 1:
        return ["virtual pipeline stages need pipeline_model_parallel_size > 1"]
    if model.num_layers is None:
        return []
    if model.uneven:
        return _uneven_virtual_problems(layout, model)
    layers = model.num_layers
    if per_chunk is not None and (layers // pp) % per_chunk:
        return [f"layers per pipeline stage ({layers // pp}) is not divisible by "
                f"num_layers_per_virtual_pipeline_stage ({per_chunk})"]
    if vpp is not None and layers % (pp * vpp):
        return [f"num_layers ({layers}) is not divisible by pipeline_model_parallel_size × "
                f"virtual_pipeline_model_parallel_size ({pp} × {vpp})"]
    return []


def _uneven_virtual_problems(layout: Layout, model: ModelShape) -> list[str]:
    """With an uneven split, every stage's layers divide into virtual_pipeline_model_parallel_size chunks."""
    vpp = layout.virtual_pipeline_model_parallel_size
    if vpp is None:
        return ["num_layers_per_virtual_pipeline_stage cannot be combined with an uneven pipeline split "
                "(decoder_first/last_pipeline_num_layers); set virtual_pipeline_model_parallel_size instead"]
    first, last = model.decoder_first_pipeline_num_layers, model.decoder_last_pipeline_num_layers
    middle_stages = layout.pipeline_model_parallel_size - (first is not None) - (last is not None)
    stages = {"decoder_first_pipeline_num_layers": first, "decoder_last_pipeline_num_layers": last}
    if middle_stages > 0:
        middle = (model.num_layers or 0) - (first or 0) - (last or 0)
        stages["layers per middle pipeline stage"] = middle // middle_stages
    return [f"{name} ({value}) is not divisible by virtual_pipeline_model_parallel_size ({vpp})"
            for name, value in stages.items() if value is not None and value % vpp]


def _batch_problems(layout: Layout, dp: int, schedule: bool = True) -> list[str]:
    """global batch = micro batch × dp × micro batches; interleaving needs micro batches in multiples of pp."""
    mbs, gbs = layout.micro_batch_size, layout.global_batch_size
    if gbs is not None and gbs % (mbs * dp):
        return [f"global_batch_size ({gbs}) is not divisible by micro_batch_size ({mbs}) × data parallel size ({dp})"]
    pp, micro_batches = layout.pipeline_model_parallel_size, (gbs or mbs * dp) // (mbs * dp)
    if schedule and layout.interleaved and micro_batches % pp:
        return [f"the interleaved schedule (virtual pipeline stages) needs the number of micro batches "
                f"(global_batch_size / (micro_batch_size × data parallel size) = {micro_batches}) divisible by "
                f"pipeline_model_parallel_size ({pp})"]
    return []


def _optimizer_problems(layout: Layout) -> list[str]:
    """Parameter all-gather overlap exists only with the distributed optimizer."""
    if layout.overlap_param_gather and not layout.use_distributed_optimizer:
        return ["overlap_param_gather needs use_distributed_optimizer"]
    return []
