"""Megatron-Core GPTModel (Llama-style) <-> Hugging Face LlamaForCausalLM: names, layouts, config.

Megatron's layout, for a model with H heads, G query groups, head dim D:
  decoder.layers.N.self_attention.linear_qkv.weight   [G * (H/G + 2) * D, hidden], per group: H/G query
                                                      heads, then one key head, then one value head
  decoder.layers.N.self_attention.linear_qkv.layer_norm_weight   the input RMSNorm
  decoder.layers.N.mlp.linear_fc1.weight              [2 * ffn, hidden]: gate rows, then up rows (SwiGLU)
  decoder.layers.N.mlp.linear_fc1.layer_norm_weight   the post-attention RMSNorm
(the local spec's modules name the two norms input_layernorm / pre_mlp_layernorm in memory and
map them to the names above in the checkpoint; both spellings are accepted).
Both use the same (non-interleaved, rotate-half) RoPE, so no permutation of q/k rows is needed.
"""

from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Callable

import torch

from tools.checkpoint.errors import ConversionError

ARCHITECTURE = "LlamaForCausalLM"
LayerMapper = Callable[[str, str, torch.Tensor, argparse.Namespace], "dict[str, torch.Tensor] | None"]
"""(HF prefix of the layer, Megatron name within the layer, tensor, args) -> HF tensors, or None."""

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_PER_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # TransformerEngine spec (and on disk)
    "input_layernorm.weight": "input_layernorm.weight",  # local spec, in memory
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def llama_problems(args: argparse.Namespace) -> list[str]:
    """Every training option of the attention, norms and MLP that Llama (and Mixtral) cannot represent."""
    problems = []
    if args.position_embedding_type != "rope":
        problems.append("position_embedding_type must be rope")
    if getattr(args, "rotary_percent", 1.0) != 1.0:
        problems.append("rotary_percent must be 1.0")
    if getattr(args, "use_rope_scaling", False):
        problems.append("use_rope_scaling must be false")
    if args.normalization != "RMSNorm":
        problems.append("normalization must be RMSNorm")
    if not args.swiglu:
        problems.append("swiglu must be true")
    if not args.disable_bias_linear:
        problems.append("disable_bias_linear must be true (no linear biases)")
    if getattr(args, "qk_layernorm", False):
        problems.append("qk_layernorm must be false")
    if getattr(args, "apply_layernorm_1p", False):
        problems.append("apply_layernorm_1p must be false")
    if getattr(args, "mtp_num_layers", None):
        problems.append("mtp_num_layers must be unset (no multi-token prediction layers)")
    return problems


def incompatible(architecture: str, problems: list[str]) -> ConversionError:
    """One error naming every training option `architecture` cannot represent."""
    return ConversionError(f"this checkpoint has no Hugging Face {architecture} equivalent: " + "; ".join(problems)
                           + " (train.model.* of the training run)")


def check_compatible(args: argparse.Namespace) -> None:
    """Raise ConversionError naming every training option that Llama cannot represent."""
    problems = llama_problems(args)
    if problems:
        raise incompatible("Llama", problems)



def split_qkv(weight: torch.Tensor, heads: int, groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Megatron's fused, per-group-interleaved QKV -> (q, k, v) as Llama's q_proj/k_proj/v_proj."""
    per_group = heads // groups
    grouped = weight.reshape(groups, per_group + 2, head_dim, -1)
    q = grouped[:, :per_group].reshape(heads * head_dim, -1)
    k = grouped[:, per_group].reshape(groups * head_dim, -1)
    v = grouped[:, per_group + 1].reshape(groups * head_dim, -1)
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """The inverse of split_qkv (used by tests to check the layout both ways)."""
    hidden = q.shape[-1]
    q = q.reshape(groups, -1, head_dim, hidden)
    k = k.reshape(groups, 1, head_dim, hidden)
    v = v.reshape(groups, 1, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def to_hf_state_dict(
    state: dict[str, torch.Tensor], args: argparse.Namespace, layer_mapper: LayerMapper | None = None
) -> dict[str, torch.Tensor]:
    """Megatron GPTModel state dict (one process, full tensors) -> Llama state dict; `layer_mapper`
    names a layer's tensors first (returning None for those it leaves to Llama's names)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("_extra_state") or tensor is None:
            continue
        layer = _LAYER.fullmatch(name)
        if layer:
            index, rest = int(layer.group(1)), layer.group(2)
            mapped = layer_mapper(f"model.layers.{index}.", rest, tensor, args) if layer_mapper else None
            out.update(mapped if mapped is not None else _layer_tensors(index, rest, tensor, args))
        elif name in _GLOBAL:
            out[_GLOBAL[name]] = tensor
        else:
            raise ConversionError(f"no Hugging Face name for Megatron parameter '{name}'")
    if "lm_head.weight" not in out and args.untie_embeddings_and_output_weights:
        raise ConversionError("the checkpoint has no output_layer.weight but was trained with untied embeddings")
    return {key: value.detach().clone().contiguous() for key, value in out.items()}


def _layer_tensors(index: int, name: str, tensor: torch.Tensor, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{index}."
    if name == "self_attention.linear_qkv.weight":
        q, k, v = split_qkv(tensor, args.num_attention_heads, args.num_query_groups, args.kv_channels)
        return {prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
                prefix + "self_attn.v_proj.weight": v}
    if name == "mlp.linear_fc1.weight":
        gate, up = torch.chunk(tensor, 2, dim=0)
        return {prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up}
    if name in _PER_LAYER:
        return {prefix + _PER_LAYER[name]: tensor}
    raise ConversionError(f"no Hugging Face name for Megatron parameter 'decoder.layers.{index}.{name}'")


def dtype_name(args: argparse.Namespace) -> str:
    """The training's parameter dtype, as Hugging Face configs name it."""
    return "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"


def rope_kwargs(config_class: type, args: argparse.Namespace) -> dict:
    """RoPE's base as `config_class` takes it: rope_parameters (transformers 5) or rope_theta (4.x)."""
    if "rope_parameters" in inspect.signature(config_class.__init__).parameters:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": float(args.rotary_base)}}
    return {"rope_theta": float(args.rotary_base)}


def common_config(args: argparse.Namespace, vocab_size: int, special_ids: dict[str, int | None], dtype: str) -> dict:
    """Config values Llama and Mixtral share: sizes, attention, norms, embeddings, token ids."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_query_groups,
        "head_dim": args.kv_channels,
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": args.norm_epsilon,
        "hidden_act": "silu",
        "tie_word_embeddings": not args.untie_embeddings_and_output_weights,
        "initializer_range": args.init_method_std,
        "dtype": dtype,
        "bos_token_id": special_ids.get("bos_token"),
        "eos_token_id": special_ids.get("eos_token"),
        "pad_token_id": special_ids.get("pad_token"),
    }


def hf_config(args: argparse.Namespace, vocab_size: int, special_ids: dict[str, int | None], dtype: str):
    """A transformers LlamaConfig equivalent to the training's model."""
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=[ARCHITECTURE],
        intermediate_size=args.ffn_hidden_size,
        attention_bias=False,
        mlp_bias=False,
        **common_config(args, vocab_size, special_ids, dtype),
        **rope_kwargs(LlamaConfig, args),
    )
