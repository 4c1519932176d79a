"""The full-size training YAMLs in upstream FlagScale's shape (aquila 7b, deepseek_v3 16b_a3b, mixtral 8x7b,
qwen3 30b_a3b, llama3 8b) train on this CPU when shrunk by Hydra overrides alone: no file is edited, only
sizes, parallel layout, data and tokenizer paths change on the command line, as a user would try a config
before taking it to GPUs. Everything else (precision, router, MLA, MTP, schedules, tokenizer type) is
the YAML's own. Loss falls; MoE and MTP losses reach metrics.jsonl; the last checkpoint is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_py

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ITERS = 30
TINY_MODEL = [  # shared by every example: sizes only
    "train.model.hidden_size=64", "train.model.num_attention_heads=4", "train.model.seq_length=64",
    "train.model.max_position_embeddings=64", "train.model.micro_batch_size=4", "train.model.global_batch_size=8",
]  # fmt: skip
ON_THIS_HOST = ["experiment.runner.nproc_per_node=2", "~experiment.envs.CUDA_VISIBLE_DEVICES"]


def hf_tokenizer(data: Path, folder: str) -> list[str]:
    """The *TokenizerFS types of the YAMLs read a Hugging Face tokenizer folder: the tiny corpus's, with the data
    tokenized by that type (prepare_data.py: `tokenizer` for Llama3TokenizerFS, `qwen_tokenizer` for Qwen's)."""
    prefix = data if folder == "tokenizer" else data / folder
    return [f"train.data.tokenizer.tokenizer_path={data}/{folder}",
            f"train.data.data_path=[0.7,{prefix}/stories_text_document,0.3,{prefix}/facts_text_document]"]  # fmt: skip


def moe(num_layers: int, experts: int = 4, topk: int = 2) -> list[str]:
    return [f"train.model.num_layers={num_layers}", f"train.model.num_experts={experts}",
            f"train.model.moe_router_topk={topk}", "train.model.ffn_hidden_size=128"]  # fmt: skip


def shrink(model: str, data: Path) -> list[str]:
    """Hydra overrides that make `examples/<model>/conf/train.yaml` a 2-process CPU job."""
    if model == "aquila":  # fp16, samples-based schedule, AquilaTokenizerFS from GPT-2-style files
        files = data / "gpt2_files"
        return [
            "train.model.num_layers=2", "train.model.multiple_of=32", f"train.model.train_samples={ITERS * 8}",
            "train.model.optimizer.lr_scheduler.lr_warmup_samples=32", "train.model.optimizer.lr_scheduler.lr=3e-3",
            "train.model.optimizer.lr_scheduler.min_lr=3e-4", f"train.system.checkpoint.save_interval={ITERS}",
            f"train.data.data_path=[0.7,{files}/stories_text_document,0.3,{files}/facts_text_document]",
            f"train.data.tokenizer.vocab_file={files}/vocab.json",
            f"train.data.tokenizer.merge_file={files}/merges.txt",
            f"train.data.tokenizer.special_tokens_file={files}/special_tokens.txt",
        ]  # fmt: skip
    if model == "deepseek_v3":  # bf16, MLA, 1 shared + 4 routed experts, sigmoid router with bias, MTP, WSD
        return [
            *moe(3), "train.model.moe_layer_freq='[0]+[1]*2'", "train.model.num_query_groups=4",
            "train.model.kv_lora_rank=16", "train.model.qk_head_dim=16", "train.model.qk_pos_emb_head_dim=8",
            "train.model.v_head_dim=16", "train.model.moe_ffn_hidden_size=32",
            "train.model.moe_shared_expert_intermediate_size=64", f"train.model.train_iters={ITERS}",
            "train.system.pipeline_model_parallel_size=1", "~train.system.decoder_first_pipeline_num_layers",
            "train.system.expert_model_parallel_size=2", f"experiment.save_steps={ITERS}",
            *hf_tokenizer(data, "qwen_tokenizer"),
        ]  # fmt: skip
    if model == "mixtral":  # a 4-host job on one host: tp=2 + sequence parallel, experts EP=2 (expert tp 1)
        return [
            *moe(2), "train.model.num_query_groups=2", "train.system.pipeline_model_parallel_size=1",
            "train.system.expert_model_parallel_size=2", "+train.system.expert_tensor_parallel_size=1",
            f"train.model.train_iters={ITERS}",
            "train.model.optimizer.lr=3e-3", "train.model.optimizer.lr_scheduler.lr_warmup_iters=4",
            "train.model.optimizer.lr_scheduler.lr_decay_iters=null",
            "train.model.eval_interval=20",
            "train.model.eval_iters=2", f"train.system.checkpoint.save_interval={ITERS}",
            "experiment.runner.nnodes=1", "~experiment.runner.hostfile",
            *hf_tokenizer(data, "qwen_tokenizer"),
        ]  # fmt: skip
    if model == "qwen3":  # bf16, GQA, qk_layernorm, 8 experts top-2 (of 128 top-8), WSD
        return [
            *moe(2, experts=8), "train.model.kv_channels=16", "train.model.num_query_groups=2",
            "train.model.moe_ffn_hidden_size=32", f"train.model.train_iters={ITERS}",
            "train.system.pipeline_model_parallel_size=1", "train.system.expert_model_parallel_size=2",
            f"experiment.save_steps={ITERS}", *hf_tokenizer(data, "qwen_tokenizer"),
        ]  # fmt: skip
    if model == "llama3":  # bf16, GQA, tp=2 + sequence parallel; its finetune load is dropped
        return [
            "train.model.num_layers=2", "train.model.ffn_hidden_size=128", "train.model.num_query_groups=2",
            f"train.model.train_samples={ITERS * 8}", "train.model.eval_interval=20", "train.model.eval_iters=2",
            "train.model.optimizer.lr_scheduler.lr=3e-3", "train.model.optimizer.lr_scheduler.min_lr=3e-4",
            "train.system.tensor_model_parallel_size=2", "train.system.pipeline_model_parallel_size=1",
            "~train.system.checkpoint.load", "~train.system.checkpoint.finetune",
            f"train.system.checkpoint.save_interval={ITERS}", *hf_tokenizer(data, "tokenizer"),
        ]  # fmt: skip
    raise AssertionError(model)


EXPECTED_FIELDS = {
    "aquila": set(),
    "deepseek_v3": {"moe_seq_load_balancing_loss", "mtp_loss"},
    "mixtral": {"moe_load_balancing_loss"},
    "qwen3": {"moe_load_balancing_loss"},
    "llama3": set(),
}


@pytest.mark.parametrize("model", sorted(EXPECTED_FIELDS))
def test_full_size_example_trains_when_shrunk_by_overrides(model: str, tiny_data: Path, tmp_path: Path) -> None:
    proc = run_py("--config-path", f"examples/{model}/conf", "--config-name", "train", "action=test",
                  f"experiment.exp_dir={tmp_path}", *ON_THIS_HOST, *TINY_MODEL, *shrink(model, tiny_data),
                  "train.system.logging.log_interval=5", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    (metrics_file,) = (tmp_path / "logs").glob("*/metrics.jsonl")
    train = [e for e in map(json.loads, metrics_file.read_text().splitlines()) if e["event"] == "train"]
    assert train[-1]["iteration"] == ITERS
    assert train[-1]["loss"] < train[0]["loss"] - 1.0, [e["loss"] for e in train]
    assert EXPECTED_FIELDS[model] <= set(train[-1]), sorted(train[-1])
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
