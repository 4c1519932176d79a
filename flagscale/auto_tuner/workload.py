"""What is being trained: the model and batch facts the rules, the memory estimate and the cost
model read, taken from the user's `train.*` section through the training program's own
(torch-free) argument parser, so defaults are derived exactly as the program derives them."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flagscale.config.flatten import flatten_leaves, to_argv
from flagscale.exceptions import ConfigError
from flagscale.train import arguments as megatron_args
from flagscale.train.tokenizer import padded_vocab_size


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """One training job's shape, independent of how it is parallelised."""

    world_size: int
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    seq_length: int
    vocab_size: int
    """Tokenizer vocabulary before padding."""
    make_vocab_size_divisible_by: int
    global_batch_size: int
    swiglu: bool = False
    untie_embeddings: bool = False
    learned_positions: bool = True
    rope: bool = False
    """Rotary position embeddings (rotated copies of query and key are kept for backward)."""
    max_position_embeddings: int = 0
    add_bias: bool = True
    layernorm: bool = True
    """LayerNorm (weight and bias) rather than RMSNorm (weight only)."""
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    precision: str = "fp32"
    """fp32, bf16 or fp16."""
    grads_in_fp32: bool = False
    """--accumulate-allreduce-grads-in-fp32."""
    optimizer: str = "adam"
    device: str = "auto"
    overlap_param_gather: bool = False
    """The job's own setting (not searched); the layout rules check it against each candidate."""
    qk_layernorm: bool = False
    """A norm over each query and key head (kv_channels weights each)."""
    num_experts: int | None = None
    """Experts per MoE layer; None: a dense model (every MoE field below is then unused)."""
    moe_ffn_hidden_size: int | None = None
    """Hidden size of each expert (the training program defaults it to ffn_hidden_size)."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_shared_expert_intermediate_size: int | None = None
    """Total hidden size of the shared experts (None: none)."""
    moe_shared_expert_gate: bool = False
    """A (1, hidden) gate weight on the shared experts' output."""
    moe_layer_freq: int | tuple[int, ...] = 1
    """Every Nth layer is MoE (int N, from layer 0), or a 0/1 pattern per layer (1: MoE)."""
    moe_token_dispatcher_type: str = "allgather"
    """How routed tokens reach the experts on other expert-parallel ranks (allgather or alltoall)."""
    expert_tensor_parallel_size: int | None = None
    """The job's own setting (not searched); None: the expert layers follow each candidate's tp."""
    first_stage_layers: int | None = None
    """Uneven pipeline split: layers on the first stage (decoder_first_pipeline_num_layers)."""
    last_stage_layers: int | None = None
    """Uneven pipeline split: layers on the last stage (decoder_last_pipeline_num_layers)."""

    def moe_layers(self) -> list[bool]:
        """Whether each layer is an MoE layer (Megatron-Core's reading of moe_layer_freq)."""
        if not self.num_experts:
            return [False] * self.num_layers
        if isinstance(self.moe_layer_freq, int):
            return [i % self.moe_layer_freq == 0 for i in range(self.num_layers)]
        return [bool(v) for v in self.moe_layer_freq]

    def expert_tp(self, tp: int) -> int:
        """Tensor parallel size of the expert layers under a candidate's tp."""
        return self.expert_tensor_parallel_size or tp

    def padded_vocab(self, tp: int) -> int:
        """Megatron's padded vocabulary for tensor parallel size `tp`."""
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tp)

    @property
    def element_bytes(self) -> int:
        """Bytes of one parameter / activation element in the model's precision."""
        return 4 if self.precision == "fp32" else 2


# Keys some Megatron-LM versions accept; read when present so the rules honour them.
OPTIONAL_KEYS = ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers")


def parse_train_args(task: dict[str, Any], world_size: int) -> argparse.Namespace:
    """The user's train section as the training program parses and derives it."""
    leaves = {k: v for k, v in flatten_leaves(task, "train").items() if k not in OPTIONAL_KEYS}
    try:
        args = megatron_args.build_parser().parse_args(to_argv(leaves))
    except SystemExit:
        raise ConfigError("the train section does not parse as Megatron arguments; "
                          "run action=dryrun to see which one") from None
    megatron_args.validate(args, None)  # the user's own layout does not matter: the tuner replaces it
    return megatron_args.derive(args, world_size)


def program_problems(task: dict[str, Any], world_size: int) -> list[str]:
    """Every problem the training program's own argument check finds (empty: it would start)."""
    leaves = {k: v for k, v in flatten_leaves(task, "train").items() if k not in OPTIONAL_KEYS}
    try:
        args = megatron_args.build_parser().parse_args(to_argv(leaves))
        megatron_args.validate(args, world_size)
    except SystemExit:
        return ["the train section does not parse as Megatron arguments"]
    except ConfigError as err:
        return [line.strip().removeprefix("- ") for line in str(err).splitlines()[1:]] or [str(err)]
    return []


def workload_from_task(task: dict[str, Any], world_size: int, vocab_size: int | None = None) -> Workload:
    """Facts of the user's train section (validated as the runner validates it)."""
    args = parse_train_args(task, world_size)
    extra = {k: v for k, (_, v) in flatten_leaves(task, "train").items() if k in OPTIONAL_KEYS}
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    return Workload(
        world_size=world_size, num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, kv_channels=args.kv_channels, seq_length=args.seq_length,
        vocab_size=vocab_size or tokenizer_vocab(args), make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        global_batch_size=args.global_batch_size, swiglu=args.swiglu,
        untie_embeddings=args.untie_embeddings_and_output_weights,
        learned_positions=args.position_embedding_type == "learned_absolute",
        rope=args.position_embedding_type == "rope",
        max_position_embeddings=args.max_position_embeddings, add_bias=not args.disable_bias_linear,
        layernorm=args.normalization == "LayerNorm", attention_dropout=args.attention_dropout,
        hidden_dropout=args.hidden_dropout, precision=precision, grads_in_fp32=args.accumulate_allreduce_grads_in_fp32,
        optimizer=args.optimizer, device=args.device, overlap_param_gather=args.overlap_param_gather,
        qk_layernorm=bool(args.qk_layernorm), **moe_facts(args, task),
        first_stage_layers=extra.get("decoder_first_pipeline_num_layers"),
        last_stage_layers=extra.get("decoder_last_pipeline_num_layers"),
    )


def moe_facts(args: argparse.Namespace, task: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields of the Workload, from the parsed (and derived) arguments; expert_tensor_parallel_size
    from the user's own leaves (the derived value copies the user's tp, which each candidate replaces)."""
    if not args.num_experts:
        return {}
    freq = args.moe_layer_freq
    leaves = flatten_leaves(task, "train")
    return {
        "num_experts": args.num_experts, "moe_ffn_hidden_size": args.moe_ffn_hidden_size,
        "moe_router_topk": args.moe_router_topk,
        "moe_shared_expert_intermediate_size": args.moe_shared_expert_intermediate_size,
        "moe_shared_expert_gate": bool(args.moe_shared_expert_gate),
        "moe_layer_freq": freq if isinstance(freq, int) else tuple(freq),
        "moe_token_dispatcher_type": args.moe_token_dispatcher_type,
        "expert_tensor_parallel_size": leaves["expert_tensor_parallel_size"][1]
        if "expert_tensor_parallel_size" in leaves else None,
    }


def tokenizer_vocab(args: argparse.Namespace) -> int:
    """Vocabulary of the configured tokenizer, read from its tokenizer.json (no `tokenizers` import)."""
    if args.tokenizer_type == "NullTokenizer":
        return int(args.vocab_size)
    path = Path(args.tokenizer_model or "") / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the vocabulary from {path} ({err}); set "
                          "experiment.auto_tuner.memory_model.vocab_size") from None
    vocab = data.get("model", {}).get("vocab") or {}
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))  # BPE dict / Unigram list
    ids |= {token["id"] for token in data.get("added_tokens", [])}
    if not ids:
        raise ConfigError(f"{path} has no vocabulary; set experiment.auto_tuner.memory_model.vocab_size")
    return max(ids) + 1
