"""The TransformerConfig the training program builds from its arguments (Megatron-LM's mapping: every
argument named like a config field, then the renamed ones, then the device decisions), and the
MoE / MLA / MTP argument rules checked before anything starts."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer import MLATransformerConfig, TransformerConfig

from flagscale.exceptions import ConfigError
from flagscale.train import arguments
from flagscale.train.model import transformer_config
from flagscale.train.runtime import Runtime

CPU = Runtime(device=torch.device("cpu"), rank=0, world_size=2, tp_rank=0, pp_rank=0, dp_rank=0)
DATA = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000", "--train-iters", "10",
        "--lr", "1e-3"]  # fmt: skip
LLAMA = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
    "--num-query-groups", "2", "--seq-length", "32", "--swiglu", "--normalization", "RMSNorm",
    "--norm-epsilon", "1e-6", "--disable-bias-linear", "--position-embedding-type", "rope", "--qk-layernorm",
    "--attention-dropout", "0", "--hidden-dropout", "0", "--init-method-std", "0.01", "--ffn-hidden-size", "128",
]  # fmt: skip
DEEPSEEK = [
    "--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32", "--swiglu",
    "--normalization", "RMSNorm", "--disable-bias-linear", "--position-embedding-type", "rope", "--qk-layernorm",
    "--ffn-hidden-size", "128", "--multi-latent-attention", "--q-lora-rank", "32", "--kv-lora-rank", "16",
    "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16", "--num-experts", "4",
    "--moe-ffn-hidden-size", "32", "--moe-shared-expert-intermediate-size", "64", "--moe-router-topk", "2",
    "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate",
    "0.01", "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "0.02",
    "--moe-z-loss-coeff", "0.001", "--moe-layer-freq", "[0]+[1]*2", "--moe-router-num-groups", "2",
    "--moe-router-group-topk", "1", "--moe-router-topk-scaling-factor", "2.5", "--moe-token-dispatcher-type",
    "alltoall", "--expert-model-parallel-size", "2", "--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "0.3",
]  # fmt: skip


def derived(*argv: str, world_size: int = 2) -> argparse.Namespace:
    return arguments.parse_args([*argv, *DATA], world_size=world_size)


def comparable(config: TransformerConfig) -> dict[str, Any]:
    """Every field but the init functions made in __post_init__ (new function objects each time)."""
    skip = {"init_method", "output_layer_init_method", "embedding_init_method"}
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name not in skip}


CPU_SETTINGS = dict(
    use_cpu_initialization=True, masked_softmax_fusion=False, bias_activation_fusion=False,
    bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
    persist_layer_norm=False, overlap_p2p_comm=False, batch_p2p_comm=False, batch_p2p_sync=False,
    deallocate_pipeline_outputs=True, attention_softmax_in_fp32=False, params_dtype=torch.float32,
    pipeline_dtype=torch.float32, inference_sampling_seed=1234, cp_comm_type="p2p", cuda_graph_scope=[],
)  # fmt: skip


def test_dense_config_equals_one_built_by_hand() -> None:
    built = transformer_config(derived(*LLAMA), CPU)
    by_hand = TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        kv_channels=16, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=1e-6, add_bias_linear=False, qk_layernorm=True, attention_dropout=0.0,
        hidden_dropout=0.0, init_method_std=0.01, **CPU_SETTINGS,
    )  # fmt: skip
    assert type(built) is TransformerConfig
    assert comparable(built) == comparable(by_hand)


def test_deepseek_like_config_equals_one_built_by_hand() -> None:
    built = transformer_config(derived(*DEEPSEEK), CPU)
    by_hand = MLATransformerConfig(
        num_layers=3, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, kv_channels=16,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", layernorm_epsilon=1e-5,
        add_bias_linear=False, qk_layernorm=True, attention_dropout=0.1, hidden_dropout=0.1,
        q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16,
        rotary_scaling_factor=1.0, num_moe_experts=4, moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=64, moe_router_topk=2, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.01,
        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.02, moe_z_loss_coeff=0.001,
        moe_layer_freq=[0, 1, 1], moe_router_num_groups=2, moe_router_group_topk=1,
        moe_router_topk_scaling_factor=2.5, moe_token_dispatcher_type="alltoall", expert_model_parallel_size=2,
        expert_tensor_parallel_size=1, mtp_num_layers=1, mtp_loss_scaling_factor=0.3, **CPU_SETTINGS,
    )  # fmt: skip
    assert type(built) is MLATransformerConfig and built.rope_type == "yarn"
    assert comparable(built) == comparable(by_hand)


def test_uneven_pipeline_and_rope_type_reach_the_config() -> None:
    args = derived(*LLAMA, "--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1",
                   "--rope-type", "rope")  # fmt: skip
    config = transformer_config(args, CPU)
    assert (config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage) == (1, None)
    assert config.pipeline_model_parallel_size == 2


def test_megatron_core_refusal_is_one_config_error() -> None:
    args = derived(*LLAMA, "--num-experts", "4", "--moe-shared-expert-intermediate-size", "-8")
    with pytest.raises(ConfigError, match="Megatron-Core refuses the model configuration: "
                                          "moe_shared_expert_intermediate_size must be"):
        transformer_config(args, CPU)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2", 2), ("[0]+[1]*3", [0, 1, 1, 1]), ("([1]*3+[0]*1)*2", [1, 1, 1, 0, 1, 1, 1, 0]), ("[1,0]", [1, 0]),
     ("2*[0]", [0, 0])],
)  # fmt: skip
def test_moe_layer_freq_is_read_like_megatron_lm(text: str, expected: int | list[int]) -> None:
    assert arguments.moe_freq_type(text) == expected


@pytest.mark.parametrize("text", ["__import__('os').getcwd()", "[1]*10**9", "[1]*1000000", "[[1]]", "[1]+1", "[0.5]"])
def test_moe_layer_freq_never_evaluates_code(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        arguments.moe_freq_type(text)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-experts", "4", "--moe-router-topk", "6"], "moe_router_topk (6) exceeds num_experts (4)"),
        (["--num-experts", "4", "--moe-layer-freq", "[0]+[1]*2"], "pattern has 3 layers, num_layers is 4"),
        (["--num-experts", "4", "--moe-router-group-topk", "1"], "moe_router_group_topk needs moe_router_num_groups"),
        (["--num-experts", "4", "--moe-router-topk", "1"], "moe_router_topk 1 with the softmax score function"),
        (["--moe-ffn-hidden-size", "32"], "moe_ffn_hidden_size needs num_experts"),
        (["--num-experts", "4", "--tensor-model-parallel-size", "2"],
         "num_experts with tensor_model_parallel_size (2) > 1 needs sequence_parallel"),
        (["--multi-latent-attention"], "multi_latent_attention and group_query_attention exclude each other"),
        (["--rope-type", "yarn"], "rope_type yarn needs multi_latent_attention"),
        (["--expert-model-parallel-size", "2"], "expert_model_parallel_size (2) > 1 needs a model with experts"),
    ],
)  # fmt: skip
def test_moe_and_attention_rules(extra: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        derived(*LLAMA, *extra)


def test_mtp_needs_rope() -> None:
    learned = [a for a in LLAMA if a not in ("--position-embedding-type", "rope")]
    with pytest.raises(ConfigError, match="needs position_embedding_type rope"):
        derived(*learned, "--mtp-num-layers", "1")


def test_moe_arguments_are_implemented_and_flex_dispatcher_is_not() -> None:
    keys = arguments.implemented_keys()
    assert {"num_experts", "moe_router_topk", "expert_model_parallel_size", "multi_latent_attention",
            "mtp_num_layers", "decoder_first_pipeline_num_layers", "use_rope_scaling",
            "moe_expert_capacity_factor", "moe_token_drop_policy"} <= keys  # fmt: skip
    assert arguments.implemented_choices("moe_token_dispatcher_type") == ("allgather", "alltoall")


def test_eval_iters_zero_means_no_validation() -> None:
    """Megatron-LM skips validation for --eval-iters 0; the final validation must not index an empty list."""
    from flagscale.train.steps import evaluate

    assert evaluate(argparse.Namespace(eval_iters=0), [], iter(()), torch.device("cpu")) is None
