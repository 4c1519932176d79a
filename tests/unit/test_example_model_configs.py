"""Each training example's model, as the training program really builds it, against one written out by hand.

The chain is the one a launch runs, stopped before any process starts: compose the experiment YAML as run.py
does, `prepare` + `plan` it as the dryrun does (the argument list torchrun hands every rank), parse that list
with the training program's own `parse_args` at the job's world size (nnodes x nproc_per_node), drop the
CUDA-only options as `runtime.initialize` does on a host without CUDA, and build the TransformerConfig with
`model.transformer_config` on a CPU Runtime. The expected config is a megatron.core TransformerConfig /
MLATransformerConfig built in this file from the example's YAML values, written out literally, so an argument
the mapping drops, renames wrong or derives wrong (ffn width, kv_channels, query groups, expert width, expert
tp, sequence parallel, dtype) makes the comparison fail. No model is built.

Device decisions (what a CPU host builds, unlike a GPU host) are in CPU below and marked `# device` where an
example's own YAML value is overridden on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer import MLATransformerConfig, TransformerConfig

from flagscale.config.loader import load_job_config
from flagscale.jobs import prepare
from flagscale.main import compose_config
from flagscale.train import arguments
from flagscale.train.model import transformer_config
from flagscale.train.runtime import Runtime
from tests.conftest import REPO

ENTRYPOINT = str(REPO / "flagscale/train/train_gpt.py")

# What this program decides on a host without CUDA (model.device_values), whatever the YAML says; on a GPU
# host the fusions follow the no_*_fusion options and the installed kernels, and p2p is batched/overlapped
# (apply_rope_fusion is off and deallocate_pipeline_outputs on on every device).
CPU = dict(
    use_cpu_initialization=True, masked_softmax_fusion=False, bias_activation_fusion=False,
    bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
    persist_layer_norm=False, overlap_p2p_comm=False, batch_p2p_comm=False, batch_p2p_sync=False,
    deallocate_pipeline_outputs=True,
)  # fmt: skip
# Megatron-LM argument defaults that differ from TransformerConfig's own defaults (the same in every example
# that does not set them): --cp-comm-type p2p, --cuda-graph-scope (none), no --attention-softmax-in-fp32.
ARGUMENT_DEFAULTS = dict(cp_comm_type="p2p", cuda_graph_scope=[], attention_softmax_in_fp32=False)
FP32 = dict(params_dtype=torch.float32, pipeline_dtype=torch.float32)
BF16 = dict(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
FP16 = dict(fp16=True, params_dtype=torch.float16, pipeline_dtype=torch.float16)


def comparable(config: TransformerConfig) -> dict[str, Any]:
    """Every field but the init functions made in __post_init__ (new function objects each time)."""
    skip = {"init_method", "output_layer_init_method", "embedding_init_method"}
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name not in skip}


# ---------------------------------------------------------------------------------------------------------------
# The configs by hand, from examples/<name>/conf/train/<model>.yaml.
# ---------------------------------------------------------------------------------------------------------------


def deepseek_v3_16b_a3b() -> TransformerConfig:
    """examples/deepseek_v3/conf/train/16b_a3b.yaml: 1 host x 8 ranks, tp=1 pp=2 (13 layers first) ep=4."""
    return MLATransformerConfig(
        num_layers=27, hidden_size=2048, num_attention_heads=16,
        num_query_groups=16,  # YAML sets 16 without group_query_attention: Megatron passes None -> heads (16)
        kv_channels=128,  # unset: hidden_size / heads = 2048 / 16
        ffn_hidden_size=11264, gated_linear_unit=True, activation_func=F.silu,  # swiglu
        normalization="RMSNorm", layernorm_epsilon=1e-6, add_bias_linear=False, qk_layernorm=True,
        attention_dropout=0.0, hidden_dropout=0.0, init_method_std=0.02,
        # MLA; q_lora_rank unset (None: a full query projection, not the config class's 512)
        multi_latent_attention=True, q_lora_rank=None, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64,
        v_head_dim=128,
        # rope: rope_type unset -> MLA's yarn; rotary_base from the YAML; the rest Megatron-LM's argument defaults
        rope_type="yarn", rotary_base=1000000, rotary_percent=1.0, rotary_scaling_factor=1.0, mscale=1.0,
        mscale_all_dim=0.0,
        # MoE
        num_moe_experts=64, moe_ffn_hidden_size=1408, moe_shared_expert_intermediate_size=2816,
        moe_layer_freq=[0] + [1] * 26, moe_router_topk=6, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.001,
        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.02, moe_router_num_groups=1,
        moe_router_group_topk=1, moe_router_topk_scaling_factor=2.446, moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,  # device: the YAML's true is a CUDA-only option, dropped on the CPU
        mtp_num_layers=1, mtp_loss_scaling_factor=0.3,
        # layout
        tensor_model_parallel_size=1, pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=13,
        expert_model_parallel_size=4, expert_tensor_parallel_size=1,  # unset: tp
        context_parallel_size=1,
        sequence_parallel=False,  # the YAML's true means nothing at tp=1 (Megatron-LM turns it off too)
        **BF16, attention_softmax_in_fp32=True, inference_sampling_seed=42,  # seed: ${experiment.seed}
        **CPU, cp_comm_type="p2p", cuda_graph_scope=[],
    )  # fmt: skip


def deepseek_v3_tiny() -> TransformerConfig:
    """examples/deepseek_v3/conf/train/tiny.yaml: 2 ranks, ep=2."""
    return MLATransformerConfig(
        num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=4, kv_channels=16,  # 64 / 4
        ffn_hidden_size=128, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=1e-5,  # unset: Megatron-LM's default
        add_bias_linear=False, qk_layernorm=True, attention_dropout=0.0, hidden_dropout=0.0, init_method_std=0.02,
        multi_latent_attention=True, q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8,
        v_head_dim=16,
        rope_type="yarn", rotary_base=10000, rotary_percent=1.0, rotary_scaling_factor=1.0, mscale=1.0,
        mscale_all_dim=0.0,
        num_moe_experts=4, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=64, moe_layer_freq=[0, 1, 1],
        moe_router_topk=2, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.01, moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.02,
        moe_router_num_groups=2, moe_router_group_topk=1, moe_router_topk_scaling_factor=2.5,
        moe_token_dispatcher_type="alltoall", mtp_num_layers=1, mtp_loss_scaling_factor=0.3,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=2,
        expert_tensor_parallel_size=1,
        **FP32, inference_sampling_seed=1234,  # seed unset: Megatron-LM's default
        **CPU, **ARGUMENT_DEFAULTS,
    )  # fmt: skip


def mixtral_8x7b() -> TransformerConfig:
    """examples/mixtral/conf/train/8x7b.yaml: 4 hosts x 8 ranks, tp=2 pp=4 ep=4."""
    return TransformerConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8, kv_channels=128,  # 4096 / 32
        ffn_hidden_size=14336, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=1e-5, add_bias_linear=False, qk_layernorm=False, attention_dropout=0.0, hidden_dropout=0.0,
        init_method_std=0.02,
        num_moe_experts=8,
        moe_ffn_hidden_size=14336,  # unset: ffn_hidden_size
        moe_router_topk=2, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.02,
        moe_token_dispatcher_type="allgather",  # unset: Megatron-LM's default
        tensor_model_parallel_size=2, pipeline_model_parallel_size=4, expert_model_parallel_size=4,
        expert_tensor_parallel_size=2,  # unset: tp
        sequence_parallel=True,  # tp=2 (the CPU runs it too, see cpu_shims)
        **BF16, inference_sampling_seed=1234,
        **CPU, **ARGUMENT_DEFAULTS,  # the YAML's no_masked_softmax_fusion: fusion is off on the CPU anyway
    )  # fmt: skip


def mixtral_tiny() -> TransformerConfig:
    """examples/mixtral/conf/train/tiny.yaml: 2 ranks, ep=2."""
    return TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=128, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=1e-5, add_bias_linear=False, attention_dropout=0.0, hidden_dropout=0.0, init_method_std=0.02,
        num_moe_experts=4, moe_ffn_hidden_size=128, moe_router_topk=2, moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.02, moe_token_dispatcher_type="allgather",
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=2,
        expert_tensor_parallel_size=1,
        **FP32, inference_sampling_seed=1234, **CPU, **ARGUMENT_DEFAULTS,
    )  # fmt: skip


def qwen3_30b_a3b() -> TransformerConfig:
    """examples/qwen3/conf/train/30b_a3b.yaml: 1 host x 8 ranks, tp=1 pp=2 ep=4."""
    return TransformerConfig(
        num_layers=48, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
        kv_channels=128,  # set in the YAML (not hidden / heads = 64)
        ffn_hidden_size=6144, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=1e-6, add_bias_linear=False, qk_layernorm=True, attention_dropout=0.0, hidden_dropout=0.0,
        init_method_std=0.02,
        num_moe_experts=128, moe_ffn_hidden_size=768, moe_router_topk=8, moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.001, moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,  # device: the YAML's true is a CUDA-only option, dropped on the CPU
        tensor_model_parallel_size=1, pipeline_model_parallel_size=2, expert_model_parallel_size=4,
        expert_tensor_parallel_size=1, context_parallel_size=1,
        sequence_parallel=False,  # the YAML's true means nothing at tp=1
        **BF16, attention_softmax_in_fp32=True, inference_sampling_seed=42,
        **CPU, cp_comm_type="p2p", cuda_graph_scope=[],
    )  # fmt: skip


def qwen3_tiny() -> TransformerConfig:
    """examples/qwen3/conf/train/tiny.yaml: 2 ranks, ep=2."""
    return TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=32,
        ffn_hidden_size=128, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=1e-5, add_bias_linear=False, qk_layernorm=True, attention_dropout=0.0, hidden_dropout=0.0,
        init_method_std=0.02,
        num_moe_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2, moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.001, moe_token_dispatcher_type="alltoall",
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=2,
        expert_tensor_parallel_size=1,
        **FP32, inference_sampling_seed=1234, **CPU, **ARGUMENT_DEFAULTS,
    )  # fmt: skip


def llama3_8b() -> TransformerConfig:
    """examples/llama3/conf/train/8b.yaml: 1 host x 8 ranks, tp=4 pp=2."""
    return TransformerConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8, kv_channels=128,
        ffn_hidden_size=14336, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=1e-5, add_bias_linear=False, qk_layernorm=False, attention_dropout=0.0, hidden_dropout=0.0,
        init_method_std=0.02,
        num_moe_experts=None,
        tensor_model_parallel_size=4, pipeline_model_parallel_size=2, expert_tensor_parallel_size=4,  # unset: tp
        sequence_parallel=True,
        **BF16, attention_softmax_in_fp32=True, inference_sampling_seed=1234,
        **CPU, cp_comm_type="p2p", cuda_graph_scope=[],  # the YAML's use_flash_attn: CUDA-only, dropped
    )  # fmt: skip


def llama3_tiny() -> TransformerConfig:
    """examples/llama3/conf/train/tiny.yaml: 2 ranks, tp=2."""
    return TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=192, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=1e-5, add_bias_linear=False, attention_dropout=0.0, hidden_dropout=0.0, init_method_std=0.02,
        tensor_model_parallel_size=2, pipeline_model_parallel_size=1, expert_tensor_parallel_size=2,
        sequence_parallel=False,  # not set in the YAML
        **FP32, inference_sampling_seed=1234, **CPU, **ARGUMENT_DEFAULTS,
    )  # fmt: skip


def aquila_7b() -> TransformerConfig:
    """examples/aquila/conf/train/7b.yaml (upstream FlagScale's Aquila2-7B): 1 host x 8 ranks, dp=8."""
    return TransformerConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32,
        num_query_groups=32,  # no group_query_attention: one group per head
        kv_channels=128,  # 4096 / 32
        # ffn_hidden_size unset, swiglu with multiple_of 256 (upstream FlagScale's rule):
        #   int(2 * 4 * 4096 / 3) = int(10922.67) = 10922; 256 * ceil(10922 / 256) = 256 * 43 = 11008
        #   (Megatron-LM's rule without multiple_of would give int(10922.67 / 64) * 64 = 10880)
        ffn_hidden_size=11008,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", layernorm_epsilon=1e-5,
        add_bias_linear=False, attention_dropout=0.0, hidden_dropout=0.0, init_method_std=0.02,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_tensor_parallel_size=1,
        **FP16, attention_softmax_in_fp32=True, inference_sampling_seed=1234,
        **CPU, cp_comm_type="p2p", cuda_graph_scope=[],  # the YAML's use_flash_attn: CUDA-only, dropped
    )  # fmt: skip


def tiny_gpt() -> TransformerConfig:
    """examples/tiny_gpt/conf/train/tiny.yaml: 2 ranks, dp=2."""
    return TransformerConfig(
        num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=4, kv_channels=32,
        ffn_hidden_size=352, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=1e-5, add_bias_linear=False, attention_dropout=0.0, hidden_dropout=0.0, init_method_std=0.02,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_tensor_parallel_size=1,
        **FP32, inference_sampling_seed=1234, **CPU, **ARGUMENT_DEFAULTS,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Example:
    example: str
    name: str
    world_size: int
    """nnodes x nproc_per_node of the experiment YAML."""
    by_hand: Callable[[], TransformerConfig]
    dropped: frozenset[str]
    """The CUDA-only options the program drops on a host without CUDA (runtime.initialize)."""
    gpt_model: dict[str, Any]
    """What model._build_chunk hands GPTModel besides the config (rope and embeddings live there)."""

    @property
    def id(self) -> str:
        return f"{self.example}/{self.name}"


def gpt_model(rotary_base: int, max_position_embeddings: int) -> dict[str, Any]:
    """Every example: rope (set as position_embedding_type or use_rotary_position_embeddings), untied output."""
    return dict(
        position_embedding_type="rope",
        rotary_base=rotary_base,
        rotary_percent=1.0,
        use_rope_scaling=False,
        max_position_embeddings=max_position_embeddings,
        untie_embeddings_and_output_weights=True,
    )


EXAMPLES = [
    Example("deepseek_v3", "train", 8, deepseek_v3_16b_a3b,
            frozenset({"moe_grouped_gemm", "no_rope_fusion", "overlap_grad_reduce", "overlap_param_gather"}),
            gpt_model(1000000, 4096)),
    Example("deepseek_v3", "train_tiny", 2, deepseek_v3_tiny, frozenset(), gpt_model(10000, 64)),
    Example("mixtral", "train", 32, mixtral_8x7b, frozenset({"no_masked_softmax_fusion"}), gpt_model(1000000, 32768)),
    Example("mixtral", "train_tiny", 2, mixtral_tiny, frozenset(), gpt_model(1000000, 64)),
    Example("qwen3", "train", 8, qwen3_30b_a3b, frozenset({"moe_grouped_gemm", "no_rope_fusion"}),
            gpt_model(1000000, 40960)),
    Example("qwen3", "train_tiny", 2, qwen3_tiny, frozenset(), gpt_model(1000000, 64)),
    Example("llama3", "train", 8, llama3_8b, frozenset({"use_flash_attn"}), gpt_model(500000, 8192)),
    Example("llama3", "train_tiny", 2, llama3_tiny, frozenset(), gpt_model(500000, 64)),
    Example("aquila", "train", 8, aquila_7b, frozenset({"use_flash_attn"}), gpt_model(10000, 2048)),
    Example("tiny_gpt", "train", 2, tiny_gpt, frozenset(), gpt_model(10000, 128)),
]  # fmt: skip


@functools.cache
def dryrun_argv(example: str, name: str) -> tuple[int, tuple[tuple[str, ...], ...]]:
    """(world size, the training program's argument list on each host) as the dryrun plans them."""
    with contextlib.chdir(REPO):  # relative paths in the examples resolve from the launching directory
        cfg, source = compose_config(REPO / "examples" / example / "conf", name,
                                     ["experiment.exp_dir=/exp/example", "action=dryrun"])  # fmt: skip
        runner, ctx = prepare(load_job_config(cfg, source))
        plan = runner.plan(ctx)
    argvs = tuple(tuple(spec.argv[spec.argv.index(ENTRYPOINT) + 1 :]) for spec in plan.processes)
    return plan.info["world_size"], argvs


def program_config(example: Example) -> tuple[argparse.Namespace, TransformerConfig]:
    """The arguments and config rank 0 of the example's job builds on a host without CUDA."""
    world, argvs = dryrun_argv(example.example, example.name)
    assert world == example.world_size
    assert all(argv == argvs[0] for argv in argvs), "hosts get different training arguments"
    args = arguments.parse_args(argvs[0], world_size=world)
    assert set(arguments.drop_cuda_only(args)) == example.dropped
    runtime = Runtime(device=torch.device("cpu"), rank=0, world_size=world, tp_rank=0, pp_rank=0, dp_rank=0)
    return args, transformer_config(args, runtime)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_example_config_equals_one_built_by_hand(example: Example) -> None:
    args, built = program_config(example)
    by_hand = example.by_hand()
    assert type(built) is type(by_hand)
    got, expected = comparable(built), comparable(by_hand)
    assert {k: (got[k], "by hand:", expected[k]) for k in got if got[k] != expected[k]} == {}
    assert {k: getattr(args, k) for k in example.gpt_model} == example.gpt_model


def test_aquila_ffn_width_is_upstream_multiple_of_rounding() -> None:
    """Aquila sets no ffn_hidden_size: the program derives it from multiple_of (11008, Aquila2-7B's width)."""
    _, argvs = dryrun_argv("aquila", "train")
    assert "--ffn-hidden-size" not in argvs[0] and argvs[0][argvs[0].index("--multiple-of") + 1] == "256"
    args = arguments.parse_args(argvs[0], world_size=8)
    assert args.ffn_hidden_size == 11008  # 256 * ceil(int(2 * 4 * 4096 / 3) / 256) = 256 * ceil(10922 / 256)


def test_bf16_reduces_gradients_in_fp32_as_megatron_lm() -> None:
    """Megatron-LM's validate_args: --bf16 turns on accumulate_allreduce_grads_in_fp32 (unless --grad-reduce-in-bf16,
    which this program refuses), and model.wrap hands that to DDP as grad_reduce_in_fp32. mixtral/train sets bf16
    without the flag (deepseek_v3, qwen3 and llama3 set it explicitly)."""
    _, argvs = dryrun_argv("mixtral", "train")
    assert "--bf16" in argvs[0] and "--accumulate-allreduce-grads-in-fp32" not in argvs[0]
    args = arguments.parse_args(argvs[0], world_size=32)
    assert args.accumulate_allreduce_grads_in_fp32
