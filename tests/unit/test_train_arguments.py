"""The training program's argument surface: torch-free import, key -> option mapping, validate() errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flagscale.exceptions import ConfigError
from flagscale.train import arguments
from tests.conftest import REPO

TINY = [
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
    "--micro-batch-size", "4", "--global-batch-size", "16", "--train-iters", "300", "--lr", "3e-3",
    "--tokenizer-model", "data/tiny_gpt/tokenizer", "--data-path", "0.7", "a_text_document", "0.3", "b_text_document",
]  # fmt: skip


def parse(*extra: str) -> object:
    return arguments.build_parser().parse_args([*TINY, *extra])


def problems(world_size: int | None, *extra: str) -> str:
    with pytest.raises(ConfigError) as err:
        arguments.validate(parse(*extra), world_size)
    return str(err.value)


def test_imports_without_torch() -> None:
    code = "import sys, flagscale.train.arguments as a; a.known_keys(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("key", "option"),
    [
        ("tensor_model_parallel_size", "--tensor-model-parallel-size"),
        ("disable_bias_linear", "--disable-bias-linear"),
        ("untie_embeddings_and_output_weights", "--untie-embeddings-and-output-weights"),
        ("data_path", "--data-path"),
        ("metrics_dir", "--metrics-dir"),
        ("use_flash_attn", "--use-flash-attn"),
        ("no_save_optim", "--no-save-optim"),
        ("num_layers_per_virtual_pipeline_stage", "--num-layers-per-virtual-pipeline-stage"),
    ],
)
def test_option_for_key(key: str, option: str) -> None:
    assert option_in_parser(option)
    assert arguments.option_for_key(key) == option


def option_in_parser(option: str) -> bool:
    return any(option in action.option_strings for action in arguments.build_parser()._actions)


def test_unknown_key_has_no_option() -> None:
    assert arguments.option_for_key("tensor_parallel_size") is None
    assert "help" not in arguments.known_keys()


def test_every_dest_is_its_option_name() -> None:
    for action in arguments.implemented_parser()._actions:
        if action.dest != "help":
            assert action.option_strings == ["--" + action.dest.replace("_", "-")]


def test_consistent_layout_passes_and_derives() -> None:
    args = parse("--tensor-model-parallel-size", "2", "--swiglu")
    arguments.validate(args, 4)
    arguments.derive(args, 4)
    assert args.data_parallel_size == 2
    assert args.ffn_hidden_size == 320  # Megatron-LM's SwiGLU default: 2/3 of 4h, multiple of 64
    assert args.kv_channels == 32 and args.num_query_groups == 4 and args.max_position_embeddings == 128
    assert args.lr_decay_iters == 300


def test_parallel_sizes_must_divide_world() -> None:
    text = problems(2, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    assert "= 4 does not divide the world size 2" in text


def test_global_batch_must_divide_by_micro_batch_times_dp() -> None:
    text = problems(2, "--global-batch-size", "12", "--micro-batch-size", "4")
    assert "global_batch_size (12) is not divisible by micro_batch_size (4) × data parallel size (2)" in text


def test_heads_and_layers_must_divide() -> None:
    assert "num_attention_heads (4) is not divisible by tensor_model_parallel_size (3)" in problems(
        3, "--tensor-model-parallel-size", "3", "--global-batch-size", "4", "--micro-batch-size", "4"
    )
    assert "num_layers (4) is not divisible by pipeline_model_parallel_size (3)" in problems(
        3, "--pipeline-model-parallel-size", "3"
    )


def test_all_problems_reported_at_once() -> None:
    text = problems(2, "--fp16", "--bf16", "--min-lr", "1.0", "--tensor-model-parallel-size", "3")
    assert "fp16 and bf16" in text and "min_lr (1.0) is larger than lr" in text and "does not divide" in text


def test_sequence_parallel_on_cpu_is_accepted() -> None:
    args = parse("--sequence-parallel", "--tensor-model-parallel-size", "2", "--device", "cpu")
    arguments.validate(args, 2)  # the CPU shims let the local spec's torch norm take it


def test_sequence_parallel_still_needs_seq_length_divisible_by_tp() -> None:
    text = problems(2, "--sequence-parallel", "--tensor-model-parallel-size", "2", "--device", "cpu",
                    "--seq-length", "63", "--max-position-embeddings", "128")
    assert "sequence_parallel needs seq_length (63) divisible by tensor_model_parallel_size (2)" in text


def test_required_values_named() -> None:
    args = arguments.build_parser().parse_args(["--num-layers", "2"])
    with pytest.raises(ConfigError) as err:
        arguments.validate(args, 1)
    for name in ("hidden_size", "num_attention_heads", "seq_length", "lr", "data_path is required"):
        assert name in str(err.value)


def test_recompute_and_virtual_pipeline_rules() -> None:
    assert "recompute_granularity full needs" in problems(1, "--recompute-granularity", "full")
    assert "need pipeline_model_parallel_size > 1" in problems(1, "--virtual-pipeline-model-parallel-size", "2")


@pytest.mark.parametrize(
    ("data_path", "expected"),
    [
        (["a", "b"], (["a", "b"], None)),
        (["0.7", "a", "0.3", "b"], (["a", "b"], [0.7, 0.3])),
        (["1", "only"], (["only"], [1.0])),
    ],
)
def test_parse_blend(data_path: list[str], expected: tuple) -> None:
    assert arguments.parse_blend(data_path) == expected


@pytest.mark.parametrize("data_path", [["0.7", "a", "0.3"], ["a", "0.3"], ["0.5", "0.5"]])
def test_bad_blend(data_path: list[str]) -> None:
    with pytest.raises(ConfigError, match="data_path"):
        arguments.parse_blend(data_path)


def test_samples_convert_to_iterations() -> None:
    args = parse("--train-samples", "1600", "--lr-warmup-samples", "160")
    args.train_iters = None
    arguments.validate(args, 2)
    arguments.derive(args, 2)
    assert (args.train_iters, args.lr_warmup_iters, args.lr_decay_iters) == (100, 10, 100)


def test_context_parallel_is_refused() -> None:
    assert "context_parallel_size > 1 needs TransformerEngine attention" in problems(2, "--context-parallel-size", "2")


def test_layout_rules_shared_with_the_auto_tuner() -> None:
    assert "ffn_hidden_size (301) is not divisible by tensor_model_parallel_size (2)" in problems(
        2, "--tensor-model-parallel-size", "2", "--ffn-hidden-size", "301", "--micro-batch-size", "8")
    assert "(global_batch_size / (micro_batch_size × data parallel size) = 1) divisible by pipeline" in problems(
        2, "--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
        "--micro-batch-size", "16")
    assert "num_query_groups (3) does not divide num_attention_heads (4)" in problems(
        1, "--group-query-attention", "--num-query-groups", "3")
    assert "micro_batch_size (0) must be >= 1" in problems(1, "--micro-batch-size", "0")


def test_sequence_parallel_without_tensor_parallel_is_switched_off_not_refused() -> None:
    arguments.validate(parse("--sequence-parallel"), 2)  # Megatron-LM: a warning, tp 1 turns it off
