"""The model: a Megatron-Core GPTModel per pipeline chunk, wrapped for mixed precision and DDP.

Only Megatron-Core modules are used (`get_gpt_layer_local_spec()`: TransformerEngine is not
needed). Fusions that need CUDA kernels are switched off on the CPU.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from flagscale.train.runtime import Runtime


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    """fp32 unless --fp16/--bf16."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def transformer_config(args: argparse.Namespace, runtime: Runtime) -> TransformerConfig:
    """Megatron's TransformerConfig from the command line."""
    cuda, dtype = runtime.is_cuda, params_dtype(args)
    interleaved = args.virtual_pipeline_model_parallel_size is not None
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        layernorm_zero_centered_gamma=args.apply_layernorm_1p,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=not args.disable_bias_linear,
        qk_layernorm=args.qk_layernorm,
        attention_dropout=args.attention_dropout,
        hidden_dropout=args.hidden_dropout,
        init_method_std=args.init_method_std,
        attention_softmax_in_fp32=args.attention_softmax_in_fp32,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel and args.tensor_model_parallel_size > 1,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        fp16=args.fp16,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=not cuda,
        masked_softmax_fusion=cuda and _has_module("scaled_masked_softmax_cuda") and not args.no_masked_softmax_fusion,
        bias_activation_fusion=cuda and _bias_activation_fusion(args),
        bias_dropout_fusion=cuda and not args.no_bias_dropout_fusion,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=(
            cuda and _has_module("fused_weight_gradient_mlp_cuda") and not args.no_gradient_accumulation_fusion
        ),
        persist_layer_norm=False,
        # Megatron-LM overlaps unbatched p2p in the interleaved schedule and batches it in 1F1B.
        # gloo gets neither: batched, a 2-stage pipeline's two directions share one FIFO channel
        # (activations and gradients swap); overlapped, a sent buffer is freed before gloo sends it.
        overlap_p2p_comm=cuda and interleaved,
        batch_p2p_comm=cuda and not interleaved,
        batch_p2p_sync=cuda,  # p2p_communication.py: a CUDA synchronize after batched send/recv
        deallocate_pipeline_outputs=True,  # also makes schedules call the autograd engine directly
    )


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


def build_chunks(args: argparse.Namespace, config: TransformerConfig, vocab_size: int) -> list[GPTModel]:
    """One GPTModel per virtual pipeline chunk this rank holds (one without interleaving)."""
    _note_unused_options(args)
    spec = get_gpt_layer_local_spec(normalization=args.normalization, qk_layernorm=args.qk_layernorm)
    chunks = args.virtual_pipeline_model_parallel_size or 1
    vp = [None] if chunks == 1 else list(range(chunks))
    return [
        GPTModel(
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
            vp_stage=stage,
        )
        for stage in vp
    ]


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
