"""Megatron-Core GPTModel with multi-latent attention (DeepSeek-V3-style) <-> Hugging Face DeepseekV3ForCausalLM.

Megatron's MLA layer (local spec) holds, per layer N (prefix decoder.layers.N.self_attention.):
  linear_q_down_proj.weight   [q_lora_rank, hidden]                  -> self_attn.q_a_proj
  q_layernorm.weight          [q_lora_rank]                          -> self_attn.q_a_layernorm
  linear_q_up_proj.weight     [heads * (qk_head_dim + rope), q_lora]  -> self_attn.q_b_proj
  linear_q_proj.weight        (instead of the three above when q_lora_rank is unset) -> self_attn.q_proj
  linear_kv_down_proj.weight  [kv_lora_rank + rope, hidden]          -> self_attn.kv_a_proj_with_mqa
  kv_layernorm.weight         [kv_lora_rank]                         -> self_attn.kv_a_layernorm
  linear_kv_up_proj.weight    [heads * (qk_head_dim + v_head_dim), kv_lora_rank] -> self_attn.kv_b_proj
  linear_proj.weight                                                 -> self_attn.o_proj
(TransformerEngine's spec fuses the two latent norms into linear_q_up_proj / linear_kv_up_proj as
layer_norm_weight; both spellings are accepted). The row layouts are the same on both sides (per head:
the no-RoPE part, then the RoPE part; the shared RoPE key after the kv latent), so every tensor is
copied as it is. RoPE: Megatron's MLA de-interleaves the RoPE dimensions (even, then odd) before a
rotate-half rotation, which is what transformers computes with rope_interleave=True.

MoE layers (Megatron's router with a sigmoid score, SequentialMLP experts, a shared expert):
  mlp.router.weight / mlp.router.expert_bias         -> mlp.gate.weight / mlp.gate.e_score_correction_bias (fp32)
  mlp.experts.local_experts.E.linear_fc1 / fc2       -> mlp.experts.E.gate_proj + up_proj / down_proj
  mlp.shared_experts.linear_fc1 / fc2                -> mlp.shared_experts.gate_proj + up_proj / down_proj
with E the global expert index (the loader reads every expert-parallel shard into one model). The
routing is the same computation: sigmoid scores, the bias only for choosing experts, group-limited
choice (n_group / topk_group), top-k weights renormalised when k > 1 (norm_topk_prob) and scaled
(routed_scaling_factor). Dense layers first (moe_layer_freq) become first_k_dense_replace.

Multi-token-prediction layers (mtp.*) are dropped: transformers' DeepseekV3ForCausalLM has no module
for them (it ignores the released model's layer 61 too), so the converted model predicts the next
token only and its config says num_nextn_predict_layers 0.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, fields

import torch

from tools.checkpoint import llama_mapping, mixtral_mapping
from tools.checkpoint.errors import ConversionError

ARCHITECTURE = "DeepseekV3ForCausalLM"
FP32_SUFFIXES = ("e_score_correction_bias",)
"""Tensors written in float32 whatever the output dtype (transformers keeps the routing bias in fp32)."""
HF_LATENT_NORM_EPS = 1e-6
"""transformers' DeepseekV3Attention builds q_a_layernorm / kv_a_layernorm with this epsilon, not rms_norm_eps."""

_ATTENTION = {
    "self_attention.linear_q_proj.weight": "self_attn.q_proj.weight",
    "self_attention.linear_q_down_proj.weight": "self_attn.q_a_proj.weight",
    "self_attention.linear_q_up_proj.weight": "self_attn.q_b_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attn.q_a_layernorm.weight",
    "self_attention.linear_kv_down_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "self_attention.linear_kv_up_proj.weight": "self_attn.kv_b_proj.weight",
    "self_attention.kv_layernorm.weight": "self_attn.kv_a_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attn.kv_a_layernorm.weight",
}
_SWIGLU = re.compile(r"mlp\.(?:experts\.local_experts\.(\d+)|(shared_experts))\.linear_fc([12])\.weight")
_ROUTER = {"mlp.router.weight": "mlp.gate.weight", "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias"}


@dataclass(frozen=True, slots=True)
class RopeSettings:
    """The MLA RoPE options as Megatron-Core's MLATransformerConfig sees them (its defaults where unset)."""

    rope_type: str
    rotary_base: float
    rotary_percent: float
    rotary_interleaved: bool
    rotary_scaling_factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    mscale: float
    mscale_all_dim: float


def rope_settings(args: argparse.Namespace) -> RopeSettings:
    """The RoPE values the training's model was built with: the saved argument, else MLATransformerConfig's default
    (as flagscale.train.model passes them; an unset rope_type is MLA's default, yarn)."""
    from megatron.core.transformer import MLATransformerConfig

    defaults = {f.name: f.default for f in fields(MLATransformerConfig)}
    given = {k: v for k, v in vars(args).items() if k in defaults and v is not None}
    values = {name: given.get(name, defaults[name]) for name in (f.name for f in fields(RopeSettings))}
    return RopeSettings(**values)


def _yarn_mscale(scale: float, mscale: float) -> float:
    """YaRN's attention temperature term, as both Megatron and transformers define it."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_problems(args: argparse.Namespace) -> list[str]:
    """Attention, norm and embedding options transformers' DeepseekV3 cannot represent."""
    problems = []
    rope = rope_settings(args)
    if args.position_embedding_type != "rope":
        problems.append("position_embedding_type must be rope")
    if rope.rotary_percent != 1.0:
        problems.append("rotary_percent must be 1.0")
    if rope.rotary_interleaved:
        problems.append("rotary_interleaved must be false (with MLA it pairs dimensions of different frequencies)")
    if rope.rope_type not in ("rope", "yarn"):
        problems.append(f"rope_type must be rope or yarn (is {rope.rope_type})")
    elif rope.rope_type == "rope" and _yarn_mscale(rope.rotary_scaling_factor, rope.mscale_all_dim) != 1.0:
        problems.append(
            "rotary_scaling_factor/mscale_all_dim must not scale the softmax with rope_type rope "
            "(transformers applies that scale only with yarn)"
        )
    if getattr(args, "no_rope_freq", None):
        problems.append("no_rope_freq must be unset (every layer uses RoPE)")
    if args.normalization != "RMSNorm":
        problems.append("normalization must be RMSNorm")
    if not args.qk_layernorm:
        problems.append("qk_layernorm must be true (DeepseekV3 always normalises the q/kv latents)")
    if getattr(args, "apply_layernorm_1p", False):
        problems.append("apply_layernorm_1p must be false")
    if not args.swiglu:
        problems.append("swiglu must be true")
    if not args.disable_bias_linear:
        problems.append("disable_bias_linear must be true (no linear biases)")
    return problems


@dataclass(frozen=True, slots=True)
class Groups:
    """transformers' n_group / topk_group for the training's group-limited routing."""

    n_group: int
    topk_group: int


def routing_groups(args: argparse.Namespace) -> Groups | None:
    """The equivalent n_group/topk_group, or None if there is none. Megatron ranks groups by the sum of their
    top (topk // group_topk) scores, transformers by the sum of their top 2; choosing every group (or no group
    limit) is n_group 1."""
    groups, chosen = args.moe_router_num_groups, args.moe_router_group_topk
    if not chosen or chosen == groups:
        return Groups(1, 1)
    if args.moe_router_topk // chosen != 2 or args.num_experts // groups < 2:
        return None
    return Groups(groups, chosen)


def moe_problems(args: argparse.Namespace) -> list[str]:
    """Router and expert options DeepseekV3's MoE block cannot represent (an MoE model only)."""
    problems = []
    if args.moe_router_score_function != "sigmoid":
        problems.append("moe_router_score_function must be sigmoid (DeepseekV3's router)")
    if "sinkhorn" in mixtral_mapping._as_list(args.moe_router_load_balancing_type):
        problems.append("moe_router_load_balancing_type must not be sinkhorn (its inference routing differs)")
    if args.num_experts < 2:
        problems.append("num_experts must be at least 2")
    elif routing_groups(args) is None:
        problems.append(
            f"moe_router_group_topk ({args.moe_router_group_topk} of {args.moe_router_num_groups} groups) "
            f"must select all groups or be half of moe_router_topk ({args.moe_router_topk}), with at least "
            "2 experts a group (DeepseekV3 ranks groups by their top-2 scores)"
        )
    if args.moe_input_jitter_eps:
        problems.append("moe_input_jitter_eps must be unset (Megatron applies the jitter at inference too)")
    if getattr(args, "moe_router_force_load_balancing", False):
        problems.append("moe_router_force_load_balancing must be false")
    if args.moe_expert_capacity_factor is not None:
        problems.append(
            "moe_expert_capacity_factor must be unset (Megatron drops tokens over capacity, DeepseekV3 none)"
        )
    if getattr(args, "moe_apply_probs_on_input", False):
        problems.append("moe_apply_probs_on_input must be false")
    if getattr(args, "moe_latent_size", None):
        problems.append("moe_latent_size must be unset")
    shared, expert = args.moe_shared_expert_intermediate_size, moe_ffn(args)
    if not shared or shared % expert:
        problems.append(
            f"moe_shared_expert_intermediate_size must be a multiple of moe_ffn_hidden_size ({expert}) "
            f"(is {shared}; DeepseekV3's MoE layers have n_shared_experts experts of that size)"
        )
    if getattr(args, "moe_shared_expert_gate", False):
        problems.append("moe_shared_expert_gate must be false (DeepseekV3's shared expert has no gate)")
    if first_dense_layers(args) is None:
        problems.append(
            f"moe_layer_freq must be dense layers first, then only MoE layers (is {args.moe_layer_freq}; "
            "DeepseekV3 has first_k_dense_replace)"
        )
    return problems


def moe_ffn(args: argparse.Namespace) -> int:
    """A routed expert's hidden size (Megatron: moe_ffn_hidden_size, else ffn_hidden_size)."""
    return args.moe_ffn_hidden_size or args.ffn_hidden_size


def first_dense_layers(args: argparse.Namespace) -> int | None:
    """first_k_dense_replace: the number of leading dense layers, or None if dense layers follow MoE ones."""
    if not args.num_experts:
        return args.num_layers
    pattern = mixtral_mapping.moe_layer_pattern(args)
    dense = pattern.index(1) if 1 in pattern else len(pattern)
    return dense if all(pattern[dense:]) else None


def check_compatible(args: argparse.Namespace) -> None:
    """Raise ConversionError naming every training option that DeepseekV3 cannot represent."""
    problems = attention_problems(args) + (moe_problems(args) if args.num_experts else [])
    if problems:
        raise llama_mapping.incompatible("DeepseekV3", problems)


def notes(args: argparse.Namespace) -> list[str]:
    """What the conversion leaves out or approximates, for the converter to print."""
    said = []
    if args.mtp_num_layers:
        said.append(
            f"dropped the {args.mtp_num_layers} multi-token-prediction layer(s) (mtp.*): transformers' "
            "DeepseekV3ForCausalLM has no module for them; the model predicts the next token only"
        )
    if args.norm_epsilon != HF_LATENT_NORM_EPS:
        said.append(
            f"transformers' DeepseekV3 normalises the q/kv latents with epsilon {HF_LATENT_NORM_EPS:g}, the "
            f"training used norm_epsilon {args.norm_epsilon:g} (vLLM uses rms_norm_eps, as trained); "
            "transformers' logits differ slightly"
        )
    return said


def _layer_tensors(prefix: str, name: str, tensor: torch.Tensor, args: argparse.Namespace) -> dict | None:
    """A layer's MLA and MoE tensors under DeepseekV3's names; None for those named as in Llama (norms, o_proj,
    a dense layer's MLP)."""
    if name in _ATTENTION:
        return {prefix + _ATTENTION[name]: tensor}
    if name in _ROUTER:
        return {prefix + _ROUTER[name]: tensor}
    swiglu = _SWIGLU.fullmatch(name)
    if swiglu is None:
        if name.startswith("self_attention.") and name != "self_attention.linear_proj.weight":
            raise ConversionError(
                f"no DeepseekV3 name for Megatron parameter '{prefix}{name}' (multi-latent attention expected)"
            )
        return None
    expert, shared, fc = swiglu.groups()
    names = prefix + (f"mlp.experts.{expert}." if shared is None else "mlp.shared_experts.")
    if fc == "2":
        return {names + "down_proj.weight": tensor}
    gate, up = torch.chunk(tensor, 2, dim=0)
    return {names + "gate_proj.weight": gate, names + "up_proj.weight": up}


def to_hf_state_dict(state: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Megatron GPTModel state dict (one process, full tensors, all experts) -> DeepseekV3 state dict; the
    multi-token-prediction layers are left out."""
    kept = {name: tensor for name, tensor in state.items() if not name.startswith("mtp.")}
    out = llama_mapping.to_hf_state_dict(kept, args, layer_mapper=_layer_tensors)
    if args.num_experts:
        _add_missing_bias(out, args)
        _check_moe_layers(out, args)
    return out


def _add_missing_bias(out: dict[str, torch.Tensor], args: argparse.Namespace) -> None:
    """Without moe_router_enable_expert_bias the experts are chosen by the scores alone: a zero correction bias."""
    for layer in range(first_dense_layers(args) or 0, args.num_layers):
        out.setdefault(
            f"model.layers.{layer}.mlp.gate.e_score_correction_bias", torch.zeros(args.num_experts, dtype=torch.float32)
        )


def _check_moe_layers(out: dict[str, torch.Tensor], args: argparse.Namespace) -> None:
    """Every MoE layer has its router, all its experts and its shared expert."""
    dense = first_dense_layers(args) or 0
    for layer in range(args.num_layers):
        mlp = f"model.layers.{layer}.mlp."
        experts = {name[len(mlp) + 8 :].split(".")[0] for name in out if name.startswith(mlp + "experts.")}
        has_router = mlp + "gate.weight" in out and mlp + "shared_experts.down_proj.weight" in out
        if layer >= dense and (len(experts) != args.num_experts or not has_router):
            raise ConversionError(
                f"layer {layer}: expected a router, a shared expert and {args.num_experts} experts, "
                f"found {len(experts)} experts{'' if has_router else ' and no router/shared expert'}"
            )
        if layer < dense and mlp + "down_proj.weight" not in out:
            raise ConversionError(f"layer {layer}: expected a dense MLP (moe_layer_freq {args.moe_layer_freq})")


def rope_parameters(args: argparse.Namespace) -> dict:
    """transformers' rope_parameters for the MLA RoPE: default, or yarn with Megatron's values (its attention
    factor written out, as Megatron computes it from mscale / mscale_all_dim)."""
    rope = rope_settings(args)
    if rope.rope_type == "rope" or rope.rotary_scaling_factor == 1.0:  # yarn with factor 1 is plain RoPE
        return {"rope_type": "default", "rope_theta": float(rope.rotary_base)}
    factor = float(rope.rotary_scaling_factor)
    return {
        "rope_type": "yarn",
        "rope_theta": float(rope.rotary_base),
        "factor": factor,
        "original_max_position_embeddings": int(rope.original_max_position_embeddings),
        "beta_fast": float(rope.beta_fast),
        "beta_slow": float(rope.beta_slow),
        "mscale": float(rope.mscale),
        "mscale_all_dim": float(rope.mscale_all_dim),
        "attention_factor": _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim),
    }


def hf_config(args: argparse.Namespace, vocab_size: int, special_ids: dict[str, int | None], dtype: str):
    """A transformers DeepseekV3Config equivalent to the training's model."""
    from transformers import DeepseekV3Config

    if args.num_experts:
        groups = routing_groups(args) or Groups(1, 1)
        moe = {
            "n_routed_experts": args.num_experts,
            "num_experts_per_tok": args.moe_router_topk,
            "moe_intermediate_size": moe_ffn(args),
            "n_shared_experts": args.moe_shared_expert_intermediate_size // moe_ffn(args),
            "n_group": groups.n_group,
            "topk_group": groups.topk_group,
            "norm_topk_prob": args.moe_router_topk > 1,  # Megatron renormalises sigmoid top-k weights when k > 1
            "routed_scaling_factor": float(args.moe_router_topk_scaling_factor or 1.0),
        }
    else:  # every layer dense: the MoE fields are unused
        moe = {
            "n_routed_experts": 1,
            "num_experts_per_tok": 1,
            "moe_intermediate_size": args.ffn_hidden_size,
            "n_shared_experts": 1,
            "n_group": 1,
            "topk_group": 1,
            "norm_topk_prob": False,
            "routed_scaling_factor": 1.0,
        }
    return DeepseekV3Config(
        architectures=[ARCHITECTURE],
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.ffn_hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_attention_heads,
        q_lora_rank=args.q_lora_rank,
        kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.qk_head_dim,
        qk_rope_head_dim=args.qk_pos_emb_head_dim,
        v_head_dim=args.v_head_dim,
        first_k_dense_replace=first_dense_layers(args),
        num_nextn_predict_layers=0,
        rope_parameters=rope_parameters(args),
        rope_interleave=True,
        attention_bias=False,
        attention_dropout=0.0,
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=args.norm_epsilon,
        hidden_act="silu",
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        initializer_range=args.init_method_std,
        dtype=dtype,
        bos_token_id=special_ids.get("bos_token"),
        eos_token_id=special_ids.get("eos_token"),
        pad_token_id=special_ids.get("pad_token"),
        **moe,
    )
