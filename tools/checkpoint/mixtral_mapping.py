"""Megatron-Core GPTModel with MoE layers (Mixtral-style) <-> Hugging Face MixtralForCausalLM.

Attention, norms, embeddings and the output layer are laid out as for Llama (llama_mapping). Each
MoE layer (Megatron-Core's local spec, SequentialMLP experts) holds
  decoder.layers.N.mlp.router.weight                              [experts, hidden]
  decoder.layers.N.mlp.experts.local_experts.E.linear_fc1.weight  [2 * moe_ffn, hidden]: gate rows, then up rows
  decoder.layers.N.mlp.experts.local_experts.E.linear_fc2.weight  [hidden, moe_ffn]
with E the global expert index (the loader merges expert-parallel shards). They are written under the
Mixtral names of the Hugging Face hub checkpoints, block_sparse_moe.gate and block_sparse_moe.experts.E.w1
(gate) / w3 (up) / w2 (down), which vLLM reads as they are and transformers 5 fuses into its
mlp.experts.gate_up_proj / down_proj while loading.

The router: without moe_router_pre_softmax Megatron takes the top k logits and softmaxes them, which
equals Mixtral's softmax over all experts, top k, renormalised to sum 1 (the common denominator cancels).
With moe_router_pre_softmax the top k probabilities are not renormalised, so that model has no Mixtral
equivalent unless k is the number of experts.
"""

from __future__ import annotations

import argparse
import re

import torch

from tools.checkpoint import llama_mapping
from tools.checkpoint.errors import ConversionError

ARCHITECTURE = "MixtralForCausalLM"
_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight")


def router_problems(args: argparse.Namespace) -> list[str]:
    """Router options whose routing or weights differ from Mixtral's softmax-top-k-renormalise."""
    problems = []
    if args.moe_router_score_function != "softmax":
        problems.append("moe_router_score_function must be softmax (Mixtral: softmax, top k, renormalised)")
    if args.moe_router_pre_softmax and args.moe_router_topk < args.num_experts:
        problems.append("moe_router_pre_softmax must be false (its top-k probabilities are not renormalised as "
                        "Mixtral's are)")
    if args.moe_router_topk_scaling_factor not in (None, 1, 1.0):
        problems.append("moe_router_topk_scaling_factor must be unset")
    if args.moe_router_num_groups or args.moe_router_group_topk:
        problems.append("moe_router_num_groups/moe_router_group_topk must be unset (no group-limited routing)")
    if args.moe_router_enable_expert_bias:
        problems.append("moe_router_enable_expert_bias must be false")
    if "sinkhorn" in _as_list(args.moe_router_load_balancing_type):
        problems.append("moe_router_load_balancing_type must not be sinkhorn (its inference routing differs)")
    if args.moe_input_jitter_eps:
        problems.append("moe_input_jitter_eps must be unset (Megatron applies the jitter at inference too)")
    if getattr(args, "moe_router_force_load_balancing", False):
        problems.append("moe_router_force_load_balancing must be false")
    return problems


def expert_problems(args: argparse.Namespace) -> list[str]:
    """Expert options that Mixtral's MoE block cannot represent."""
    problems = []
    if args.moe_expert_capacity_factor is not None:
        problems.append("moe_expert_capacity_factor must be unset (Megatron drops tokens over capacity, Mixtral none)")
    if getattr(args, "moe_apply_probs_on_input", False):
        problems.append("moe_apply_probs_on_input must be false")
    if args.moe_shared_expert_intermediate_size:
        problems.append("moe_shared_expert_intermediate_size must be unset (Mixtral has no shared expert)")
    if getattr(args, "moe_latent_size", None):
        problems.append("moe_latent_size must be unset")
    if not all(moe_layer_pattern(args)):
        problems.append(f"every layer must be an MoE layer (moe_layer_freq is {args.moe_layer_freq}; Mixtral has no "
                        "dense layers)")
    return problems


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def moe_layer_pattern(args: argparse.Namespace) -> list[int]:
    """1 for each MoE layer, 0 for each dense one, as Megatron-Core reads moe_layer_freq."""
    freq = args.moe_layer_freq
    if isinstance(freq, int):
        return [1 if index % freq == 0 else 0 for index in range(args.num_layers)]
    return list(freq)


def check_compatible(args: argparse.Namespace) -> None:
    """Raise ConversionError naming every training option that Mixtral cannot represent."""
    problems = llama_mapping.llama_problems(args) + router_problems(args) + expert_problems(args)
    if problems:
        raise llama_mapping.incompatible("Mixtral", problems)


def _moe_tensors(prefix: str, name: str, tensor: torch.Tensor, args: argparse.Namespace) -> dict | None:
    """A MoE layer's router and experts under Mixtral's names; None for the layer's other tensors."""
    moe = prefix + "block_sparse_moe."
    if name == "mlp.router.weight":
        return {moe + "gate.weight": tensor}
    expert = _EXPERT.fullmatch(name)
    if expert is None:
        if name.startswith("mlp."):
            raise ConversionError(f"no Mixtral name for Megatron parameter '{prefix}{name}' (SequentialMLP experts "
                                  "and a router expected)")
        return None
    names = f"{moe}experts.{expert.group(1)}."
    if expert.group(2) == "2":
        return {names + "w2.weight": tensor}
    gate, up = torch.chunk(tensor, 2, dim=0)
    return {names + "w1.weight": gate, names + "w3.weight": up}


def to_hf_state_dict(state: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Megatron GPTModel state dict (one process, full tensors, all experts) -> Mixtral state dict."""
    out = llama_mapping.to_hf_state_dict(state, args, layer_mapper=_moe_tensors)
    gates = [name for name in out if name.endswith("block_sparse_moe.gate.weight")]
    experts = {name.split(".experts.")[1].split(".")[0] for name in out if ".experts." in name}
    if len(gates) != args.num_layers or len(experts) != args.num_experts:
        raise ConversionError(f"expected {args.num_layers} routers and {args.num_experts} experts per layer, found "
                              f"{len(gates)} routers and {len(experts)} experts")
    return out


def hf_config(args: argparse.Namespace, vocab_size: int, special_ids: dict[str, int | None], dtype: str):
    """A transformers MixtralConfig equivalent to the training's model."""
    from transformers import MixtralConfig

    return MixtralConfig(
        architectures=[ARCHITECTURE],
        intermediate_size=args.moe_ffn_hidden_size or args.ffn_hidden_size,
        num_local_experts=args.num_experts,
        num_experts_per_tok=args.moe_router_topk,
        router_aux_loss_coef=_first_coefficient(args.moe_aux_loss_coeff),
        router_jitter_noise=0.0,
        sliding_window=None,
        **llama_mapping.common_config(args, vocab_size, special_ids, dtype),
        **llama_mapping.rope_kwargs(MixtralConfig, args),
    )


def _first_coefficient(value: object) -> float:
    """The (first) load-balancing loss coefficient; only used if the model is trained further."""
    first = _as_list(value)[0]
    return float(first) if first else 0.0
