"""The model: a Megatron-Core GPTModel per pipeline chunk, wrapped for mixed precision and DDP.

The TransformerConfig is built as Megatron-LM builds it: every argument named like a config field is
taken as it is, then the arguments whose names differ are mapped, then this program's device
decisions (fusions that need CUDA kernels are off on the CPU, how pipeline p2p runs on gloo).
Only Megatron-Core's local modules are used (no TransformerEngine): `get_gpt_layer_local_spec()`
for dense models, the per-layer decoder block spec for MoE models (`moe_layer_freq`), and the
multi-token prediction block spec built from the last decoder layer's spec.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import fields
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models import backends
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_decoder_layer_specs,
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer import MLATransformerConfig, TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from flagscale.exceptions import ConfigError
from flagscale.train.cpu_shims import LocalMLACoreAttention
from flagscale.train.runtime import Runtime


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    """fp32 unless --fp16/--bf16."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def transformer_config(args: argparse.Namespace, runtime: Runtime) -> TransformerConfig:
    """Megatron's TransformerConfig (MLATransformerConfig with --multi-latent-attention) from the arguments."""
    config_class = MLATransformerConfig if args.multi_latent_attention else TransformerConfig
    values = {**same_named_values(args, config_class), **renamed_values(args), **device_values(args, runtime.is_cuda)}
    try:
        return config_class(**values)
    except (AssertionError, ValueError) as err:  # TransformerConfig.__post_init__'s checks
        raise ConfigError(f"Megatron-Core refuses the model configuration: {err}") from None


def same_named_values(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """Every argument whose name is a field of `config_class`, as Megatron-LM maps them."""
    given = vars(args)
    values = {f.name: _plain(given[f.name]) for f in fields(config_class) if f.init and f.name in given}
    if values.get("rope_type") is None:
        values.pop("rope_type", None)  # the config class's own default: yarn for MLA, rope otherwise
    return values


def _plain(value: Any) -> Any:
    """Lists from the vocabulary's defaults are tuples; the config expects lists."""
    return list(value) if isinstance(value, tuple) else value


def renamed_values(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields whose argument has another name or another form."""
    dtype = params_dtype(args)
    cp_comm_type = _plain(args.cp_comm_type)
    return {
        "layernorm_epsilon": args.norm_epsilon,
        "layernorm_zero_centered_gamma": args.apply_layernorm_1p,
        "gated_linear_unit": args.swiglu,
        "activation_func": F.silu if args.swiglu else F.gelu,
        "add_bias_linear": not args.disable_bias_linear,
        "num_query_groups": args.num_query_groups if args.group_query_attention else None,
        "num_moe_experts": args.num_experts or None,
        "num_layers_in_first_pipeline_stage": args.decoder_first_pipeline_num_layers,
        "num_layers_in_last_pipeline_stage": args.decoder_last_pipeline_num_layers,
        "sequence_parallel": args.sequence_parallel and args.tensor_model_parallel_size > 1,
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "attention_backend": AttnBackend[args.attention_backend],
        "cp_comm_type": cp_comm_type[0] if isinstance(cp_comm_type, list) and len(cp_comm_type) == 1 else cp_comm_type,
        "inference_sampling_seed": args.seed,
    }


def device_values(args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """Kernel fusions (CUDA only) and pipeline p2p: what this device can run."""
    interleaved = args.virtual_pipeline_model_parallel_size is not None
    return {
        "use_cpu_initialization": not cuda,
        "masked_softmax_fusion": (
            cuda and _has_module("scaled_masked_softmax_cuda") and not args.no_masked_softmax_fusion
        ),
        "bias_activation_fusion": cuda and _bias_activation_fusion(args),
        "bias_dropout_fusion": cuda and not args.no_bias_dropout_fusion,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": (
            cuda and _has_module("fused_weight_gradient_mlp_cuda") and not args.no_gradient_accumulation_fusion
        ),
        "persist_layer_norm": False,
        # Megatron-LM overlaps unbatched p2p in the interleaved schedule and batches it in 1F1B.
        # gloo gets neither: batched, a 2-stage pipeline's two directions share one FIFO channel
        # (activations and gradients swap); overlapped, a sent buffer is freed before gloo sends it.
        "overlap_p2p_comm": cuda and interleaved,
        "batch_p2p_comm": cuda and not interleaved,
        "batch_p2p_sync": cuda,  # p2p_communication.py: a CUDA synchronize after batched send/recv
        "deallocate_pipeline_outputs": True,  # also makes schedules call the autograd engine directly
    }


def _has_module(name: str) -> bool:
    """Whether an optional CUDA extension (Apex, Megatron's fused kernels) is installed."""
    return importlib.util.find_spec(name) is not None


def _bias_activation_fusion(args: argparse.Namespace) -> bool:
    """Megatron's jit-fused bias+SwiGLU, or bias+GeLU (which needs a bias to fuse)."""
    if args.swiglu:
        return not args.no_bias_swiglu_fusion
    return not args.no_bias_gelu_fusion and not args.disable_bias_linear


def _note_unused_options(args: argparse.Namespace) -> None:
    if args.use_flash_attn and dist.get_rank() == 0:
        print("note: use_flash_attn is not applied: this program builds Megatron-Core's local layer spec", flush=True)


def _check_norm(args: argparse.Namespace) -> None:
    """Zero-centred gamma exists in Apex's fused LayerNorm only among the local spec's norms."""
    if args.apply_layernorm_1p and (args.normalization == "RMSNorm" or backends.LNImpl is WrappedTorchNorm):
        raise ConfigError(f"apply_layernorm_1p needs Apex's fused LayerNorm (not installed, or normalization "
                          f"{args.normalization}): the local layers' torch norm has no zero-centred gamma; unset it")


def layer_spec(
    args: argparse.Namespace, config: TransformerConfig, vp_stage: int | None
) -> ModuleSpec | TransformerBlockSubmodules:
    """The decoder's spec: one layer spec for a dense model, per-layer specs (dense or MoE) with experts."""
    if args.num_experts:
        block = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization=args.normalization,
            qk_l2_norm=args.qk_l2_norm, vp_stage=vp_stage,
        )
        if args.multi_latent_attention:
            block.layer_specs = [_with_local_mla_attention(layer) for layer in block.layer_specs]
        return block
    return _local_layer_spec(args, num_experts=None)


def _local_layer_spec(args: argparse.Namespace, num_experts: int | None) -> ModuleSpec:
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=args.qk_layernorm,
        multi_latent_attention=args.multi_latent_attention, normalization=args.normalization,
        qk_l2_norm=args.qk_l2_norm,
    )
    return _with_local_mla_attention(spec) if args.multi_latent_attention else spec


def _with_local_mla_attention(spec: ModuleSpec) -> ModuleSpec:
    """The local MLA spec with a core attention that takes MLA's head sizes (see cpu_shims)."""
    attention = spec.submodules.self_attention.submodules
    if attention.core_attention is DotProductAttention:
        attention.core_attention = LocalMLACoreAttention
    return spec


def mtp_spec(
    args: argparse.Namespace, config: TransformerConfig, spec: ModuleSpec | TransformerBlockSubmodules,
    vp_stage: int | None,
) -> ModuleSpec | None:
    """Multi-token prediction block, its layers shaped like the last decoder layer; None without MTP
    or on a pipeline stage that holds no MTP layer."""
    if not args.mtp_num_layers:
        return None
    if isinstance(spec, TransformerBlockSubmodules) and not spec.layer_specs:
        last = _local_layer_spec(args, num_experts=args.num_experts)  # no decoder layer on this stage
    else:
        last = get_gpt_decoder_layer_specs(
            config, use_transformer_engine=False, normalization=args.normalization,
            qk_l2_norm=args.qk_l2_norm, vp_stage=vp_stage,
        )[-1]
        last = _with_local_mla_attention(last) if args.multi_latent_attention else last
    return get_gpt_mtp_block_spec(config, last, use_transformer_engine=False, vp_stage=vp_stage)


def build_chunks(args: argparse.Namespace, config: TransformerConfig, vocab_size: int) -> list[GPTModel]:
    """One GPTModel per virtual pipeline chunk this rank holds (one without interleaving)."""
    _note_unused_options(args)
    _check_norm(args)
    chunks = args.virtual_pipeline_model_parallel_size or 1
    return [_build_chunk(args, config, vocab_size, stage) for stage in ([None] if chunks == 1 else range(chunks))]


def _build_chunk(args: argparse.Namespace, config: TransformerConfig, vocab_size: int, stage: int | None) -> GPTModel:
    spec = layer_spec(args, config, stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        mtp_block_spec=mtp_spec(args, config, spec, stage),
        vp_stage=stage,
    )


def wrap(args: argparse.Namespace, config: TransformerConfig, chunks: list[GPTModel], runtime: Runtime):
    """Move to the device, add Float16Module for fp16/bf16, then Megatron-Core DDP."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    wrapped = []
    for index, chunk in enumerate(chunks):
        module = chunk.to(runtime.device)
        if args.fp16 or args.bf16:
            module = Float16Module(config, module)
        wrapped.append(
            DistributedDataParallel(config=config, ddp_config=ddp_config, module=module, disable_bucketing=index > 0)
        )
    return wrapped


def count_parameters(chunks: list[GPTModel]) -> int:
    """Parameters on this rank."""
    return sum(p.numel() for chunk in chunks for p in chunk.parameters())
