"""The argument vocabulary: Megatron-LM/FlagScale/torchrun tables, key normalisation, value coercion, categories."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

import pytest

from flagscale.config import vocabulary as vocab
from flagscale.config.vocabulary import Argument, category, coerce, normalize_key, suggest
from flagscale.exceptions import ConfigError
from tests.conftest import REPO

# Real options from each parser-building function of Megatron-LM core_v0.16.1 (plain add_argument calls
# and the dataclass-driven groups), and from pretrain_gpt.py's extra ModelOpt options.
MEGATRON_NAMES = {
    "transformer configuration": ["num_layers", "hidden_size", "num_attention_heads", "kv_channels",
                                  "ffn_hidden_size", "num_query_groups", "norm_epsilon", "apply_layernorm_1p",
                                  "disable_bias_linear", "recompute_granularity", "recompute_method",
                                  "recompute_num_layers", "sequence_parallel", "tensor_model_parallel_size",
                                  "pipeline_model_parallel_size", "context_parallel_size", "attention_backend",
                                  "qk_layernorm", "moe_router_topk", "moe_aux_loss_coeff", "moe_grouped_gemm",
                                  "mtp_num_layers", "multi_latent_attention", "fp8_format", "transformer_impl"],
    "network size": ["encoder_num_layers", "group_query_attention", "max_position_embeddings",
                     "position_embedding_type", "rotary_base", "rotary_percent", "use_rope_scaling", "swiglu",
                     "no_position_embedding", "untie_embeddings_and_output_weights", "make_vocab_size_divisible_by"],
    "regularization": ["attention_dropout", "hidden_dropout", "weight_decay", "clip_grad", "adam_beta1", "adam_eps"],
    "training": ["micro_batch_size", "global_batch_size", "train_iters", "train_samples", "exit_interval",
                 "no_masked_softmax_fusion", "no_bias_gelu_fusion", "no_gradient_accumulation_fusion",
                 "use_flash_attn", "optimizer", "dataloader_type", "rampup_batch_size", "exit_signal"],
    "learning rate": ["lr", "min_lr", "lr_decay_style", "lr_wsd_decay_style", "lr_warmup_fraction",
                      "lr_decay_iters", "override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler"],
    "checkpointing": ["save", "load", "save_interval", "persistent_save_interval", "no_save_optim", "finetune",
                      "ckpt_format", "async_save"],
    "mixed precision": ["fp16", "bf16", "loss_scale", "initial_loss_scale", "hysteresis",
                        "accumulate_allreduce_grads_in_fp32"],
    "distributed": ["distributed_backend", "use_distributed_optimizer", "overlap_grad_reduce",
                    "overlap_param_gather", "expert_model_parallel_size", "num_layers_per_virtual_pipeline_stage"],
    "validation and data": ["eval_iters", "eval_interval", "data_path", "split", "mock_data", "num_workers",
                            "reset_position_ids", "eod_mask_loss", "seq_length", "data_cache_path"],
    "tokenizer": ["tokenizer_type", "tokenizer_model", "vocab_size", "vocab_file", "merge_file"],
    "moe / mla / experimental": ["num_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                                 "moe_token_dispatcher_type", "moe_layer_freq", "q_lora_rank", "kv_lora_rank",
                                 "qk_head_dim", "v_head_dim", "rope_type", "enable_experimental", "spec"],
    "logging and the rest": ["log_interval", "tensorboard_dir", "wandb_project", "timing_log_level", "profile",
                             "seed", "init_method_std", "inprocess_restart", "enable_ft_package", "rerun_mode",
                             "sft", "disable_msc", "yaml_cfg", "inference_max_seq_length", "rl_default_temperature"],
    "modelopt": ["export_model_type", "export_kd_teacher_load", "modelopt_enabled"],
}
FLAGSCALE_NAMES = ["multiple_of", "hidden_dim_multiplier", "norm_init_weight", "hetero_process_meshes",
                   "hetero_device_types", "hetero_pipeline_layer_split", "enable_hetero", "tokenizer_path",
                   "special_tokens_file", "recompute_granularity_per_stage_micro_batch", "skip_samples_range",
                   "use_partial_reduce_for_shared_embedding", "standalone_embedding_stage", "auto_skip_spiky_loss",
                   "peft_type", "lora_dim", "lr_decay_stablelm2_alpha", "wandb_mode", "num_mtp_predictor"]
FLAGSCALE_TOKENIZERS = ["AquilaTokenizerFS", "HFTokenizerFS", "Llama3TokenizerFS", "QwenTokenizerFS",
                        "Qwen2TokenizerFS"]
TORCHRUN_NAMES = ["nnodes", "nproc_per_node", "rdzv_id", "rdzv_backend", "rdzv_endpoint", "max_restarts",
                  "redirects", "tee", "log_dir", "master_addr", "master_port", "node_rank", "standalone",
                  "monitor_interval", "start_method"]


@pytest.fixture(scope="module")
def table() -> dict[str, Argument]:
    return dict(vocab.megatron_arguments())


def test_megatron_options_are_present(table: dict[str, Argument]) -> None:
    missing = {group: [n for n in names if n not in table] for group, names in MEGATRON_NAMES.items()}
    assert not any(missing.values()), missing
    assert all(table[n].source == "megatron" for names in MEGATRON_NAMES.values() for n in names)
    assert sum(a.source == "megatron" for a in table.values()) > 650


def test_entries_are_keyed_by_spelling_with_dest_kept(table: dict[str, Argument]) -> None:
    fusion = table["no_masked_softmax_fusion"]
    assert (fusion.kind, fusion.dest, fusion.default, fusion.options) == (
        "negated_flag", "masked_softmax_fusion", True, ("--no-masked-softmax-fusion",))
    assert table["use_flash_attn"].kind == "flag" and table["use_flash_attn"].default is False
    assert table["num_experts"].type == "int" and table["num_experts"].kind == "value"
    assert table["recompute_granularity"].choices == ("full", "selective")
    assert table["save_interval"].dest == table["persistent_save_interval"].dest == "save_interval"
    assert table["data_path"].kind == "list"
    assert table["rampup_batch_size"].nargs == 3
    assert "--no-bias-linear" not in table["disable_bias_linear"].options
    assert table["disable_bias_linear"].dest == "add_bias_linear"


def test_lr_wsd_decay_style_choices(table: dict[str, Argument]) -> None:
    assert set(table["lr_wsd_decay_style"].choices or ()) >= {"exponential", "linear", "cosine", "minus_sqrt"}


def test_flagscale_additions_are_present(table: dict[str, Argument]) -> None:
    assert [n for n in FLAGSCALE_NAMES if n not in table] == []
    assert {table[n].source for n in FLAGSCALE_NAMES} == {"flagscale"}
    assert table["hetero_process_meshes"].kind == "list" and table["hetero_process_meshes"].type == "int"
    tokenizer = table["tokenizer_type"]
    assert set(FLAGSCALE_TOKENIZERS) <= set(tokenizer.choices or ()) and "HuggingFaceTokenizer" in tokenizer.choices
    assert set(FLAGSCALE_TOKENIZERS) <= set(tokenizer.flagscale_choices)
    assert tokenizer.source == "megatron"
    assert "flagcx" in (table["distributed_backend"].choices or ())


def test_tables_are_sorted_with_metadata() -> None:
    for name, key in (("megatron_arguments.json", "arguments"), ("torchrun_options.json", "options")):
        data = json.loads((vocab.DATA_DIR / name).read_text())
        names = [e["name"] for e in data[key]]
        assert names == sorted(names) and len(names) == len(set(names))
        assert "generated_by" in data["meta"]
    meta = vocab.metadata()
    assert meta["megatron"]["ref"] == "core_v0.16.1" and len(meta["megatron"]["commit"]) == 40
    assert len(meta["flagscale"]["commit"]) == 40


def test_normalize_key() -> None:
    assert normalize_key("tensor-model-parallel-size") == "tensor_model_parallel_size"
    assert normalize_key("--tensor-model-parallel-size") == "tensor_model_parallel_size"
    assert normalize_key("num_layers") == "num_layers"


def test_coerce_numbers_from_strings(table: dict[str, Argument]) -> None:
    assert coerce(table["num_layers"], "1", "t.yaml:3") == 1
    assert coerce(table["num_layers"], 4, "t.yaml:3") == 4
    assert coerce(table["train_iters"], "1e3", "t.yaml:3") == 1000
    assert coerce(table["lr"], "1e-5", "t.yaml:4") == pytest.approx(1e-5)
    assert coerce(table["norm_epsilon"], 1, "t.yaml:4") == 1.0
    assert coerce(table["data_path"], ["1", "a"], "x") == ["1", "a"]
    assert coerce(table["hetero_process_meshes"], ["1", 2], "x") == [1, 2]
    assert coerce(table["num_layers"], None, "x") is None


def test_coerce_rejects_with_a_one_line_message(table: dict[str, Argument]) -> None:
    with pytest.raises(ConfigError) as err:
        coerce(table["num_layers"], "abc", "train.yaml:12")
    message = str(err.value)
    assert "num_layers" in message and "'abc'" in message and "integer" in message and "train.yaml:12" in message
    assert "\n" not in message
    for bad in (1.5, True, [1]):
        with pytest.raises(ConfigError):
            coerce(table["num_layers"], bad, "x")
    with pytest.raises(ConfigError, match="number"):
        coerce(table["lr"], "fast", "x")
    with pytest.raises(ConfigError, match="3 values"):
        coerce(table["rampup_batch_size"], [1, 2], "x")


def test_coerce_flags(table: dict[str, Argument]) -> None:
    assert coerce(table["bf16"], True, "x") is True
    assert coerce(table["bf16"], "false", "x") is False
    assert coerce(table["no_masked_softmax_fusion"], "True", "x") is True
    with pytest.raises(ConfigError, match="true or false"):
        coerce(table["bf16"], "yes please", "x")


def test_coerce_enforces_choices(table: dict[str, Argument]) -> None:
    assert coerce(table["recompute_granularity"], "full", "x") == "full"
    assert coerce(table["tokenizer_type"], "AquilaTokenizerFS", "x") == "AquilaTokenizerFS"
    assert coerce(table["timing_log_level"], "1", "x") == 1
    with pytest.raises(ConfigError) as err:
        coerce(table["recompute_granularity"], "partial", "conf.yaml:7")
    assert "full, selective" in str(err.value) and "recompute_granularity" in str(err.value)
    with pytest.raises(ConfigError):
        coerce(table["lora_target_modules"], ["linear_qkv", "nope"], "x")


def test_suggest(table: dict[str, Argument]) -> None:
    assert suggest("num_layer", table) == "num_layers"
    assert suggest("tensor-model-paralel-size", table) == "tensor_model_parallel_size"
    assert suggest("completely_unrelated_thing", table) is None


def test_categories(table: dict[str, Argument]) -> None:
    none: frozenset[str] = frozenset()
    for name in ("use_flash_attn", "transformer_impl", "no_masked_softmax_fusion", "overlap_grad_reduce",
                 "tp_comm_overlap", "enable_cuda_graph", "use_cpu_initialization", "moe_grouped_gemm"):
        assert category(name, none) == "cuda_only", name
    for name in ("bf16", "fp16", "fp8_format", "recompute_granularity", "sequence_parallel", "num_layers",
                 "no_bias_gelu_fusion", "swiglu"):
        assert category(name, none) != "cuda_only", name
    assert category("wandb_project", none) == "inert"
    assert category("timing_log_level", none) == "inert"
    assert category("num_layers", none) == "not_implemented"
    assert category("use_flash_attn", frozenset({"use_flash_attn"})) == "used"
    assert category("bf16", frozenset({"bf16"})) == "used"


def test_category_patterns_all_match_something(table: dict[str, Argument]) -> None:
    from fnmatch import fnmatchcase

    for pattern in vocab.CUDA_ONLY | vocab.INERT:
        assert any(fnmatchcase(name, pattern) for name in table), pattern


def test_torchrun_table() -> None:
    options = vocab.torchrun_options()
    assert [n for n in TORCHRUN_NAMES if n not in options] == []
    assert options["nproc_per_node"].options == ("--nproc-per-node", "--nproc_per_node")
    assert options["max_restarts"].type == "int" and options["standalone"].kind == "flag"
    assert options["start_method"].choices == ("spawn", "fork", "forkserver")


def test_argument_is_frozen(table: dict[str, Argument]) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        table["num_layers"].name = "x"  # type: ignore[misc]
    assert vocab.megatron_arguments() is vocab.megatron_arguments()


def test_loading_is_fast_and_torch_free() -> None:
    code = ("import sys, time; t = time.perf_counter(); from flagscale.config import vocabulary as v; "
            "v.megatron_arguments(); v.torchrun_options(); v.megatron_arguments()['num_layers']; "
            "print(time.perf_counter() - t, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    seconds, torch_loaded = out.stdout.split()
    assert torch_loaded == "False"
    assert float(seconds) < 0.5


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


@pytest.mark.skipif(_missing("torch"), reason="torch is not importable: cannot compare with torchrun's live parser")
def test_torchrun_table_matches_live_parser() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tools.compat.extract_arguments import TORCHRUN_JSON, torchrun_vocabulary

    stored = json.loads(TORCHRUN_JSON.read_text())
    live = json.loads(json.dumps(torchrun_vocabulary()))
    assert live == stored["options"], f"regenerate {TORCHRUN_JSON.name} (made with torch {stored['meta']['torch']})"


# TransformerConfig fields Megatron-LM core_v0.16.1 megatron/training/arguments.py gives no option of their own
# (callables, dtypes, and fields it excludes from the dataclass-driven group).
TRANSFORMER_CONFIG_WITHOUT_OPTION = frozenset("""
    virtual_pipeline_model_parallel_size params_dtype timers finalize_model_grads_func grad_scale_func no_sync_func
    grad_sync_func param_sync_func enable_autocast autocast_dtype num_microbatches_with_partial_activation_checkpoints
    use_te_rng_tracker tp_comm_atomic_ag tp_comm_atomic_rs tp_comm_overlap_disable_qkv tp_comm_overlap_disable_fc1
    pipeline_dtype variable_seq_lengths batch_p2p_comm batch_p2p_sync deallocate_pipeline_outputs cpu_offloading
    _cpu_offloading_context cpu_offloading_activations cpu_offloading_weights cpu_offloading_double_buffering
    num_layers_in_first_pipeline_stage num_layers_in_last_pipeline_stage softmax_scale gated_linear_unit
    activation_func activation_func_fp8_input_store num_moe_experts init_method output_layer_init_method
    embedding_init_method bias_activation_fusion persist_layer_norm memory_efficient_layer_norm fused_single_qkv_rope
    fp8_param fp8_dot_product_attention fp8_multi_head_attention tp_only_amax_red use_kitchen
    moe_router_topk_limited_devices moe_token_dropping cuda_graph_use_single_mempool cuda_graph_retain_backward_graph
    disable_parameter_transpose_cache inference_sampling_seed use_inference_optimized_layers heterogeneous_block_specs
    hetereogenous_dist_checkpoint quant_recipe
""".split())


@pytest.mark.skipif(_missing("megatron.core"), reason="megatron-core is not installed")
def test_installed_transformer_config_fields_have_options(table: dict[str, Argument]) -> None:
    """The dataclass-driven options match the installed megatron-core (regenerate the table when it changes)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dests = {a.dest for a in table.values()}
    fields = [f.name for f in dataclasses.fields(TransformerConfig) if f.init]
    assert [n for n in fields if n not in dests and n not in TRANSFORMER_CONFIG_WITHOUT_OPTION] == []
