"""Hydra overrides that shrink the full-size training YAMLs (upstream FlagScale's, and this repository's copies
in upstream's shape) to a 2-process CPU job: sizes, parallel layout, data and tokenizer paths only. Precision,
router, MLA, MTP, schedules and tokenizer types stay the YAML's own.

Data: the tiny_gpt corpus (`python examples/tiny_gpt/prepare_data.py`), which holds a tokenizer in each shape
the YAMLs load (a Hugging Face folder, GPT-2-style files, a Qwen-shaped folder) and the corpora tokenized by each.
"""

from __future__ import annotations

from pathlib import Path

ITERS = 30
# The experiment-level changes: 2 processes on this host, no GPU list. `++` sets a key whether or not the
# YAML has it (upstream's experiment YAMLs often leave nproc_per_node to the hostfile).
ON_THIS_HOST = ["++experiment.runner.nproc_per_node=2", "~experiment.envs.CUDA_VISIBLE_DEVICES"]
TINY_MODEL = [  # shared by every model: sizes only
    "train.model.hidden_size=64", "train.model.num_attention_heads=4", "train.model.seq_length=64",
    "train.model.max_position_embeddings=64", "train.model.micro_batch_size=4", "train.model.global_batch_size=8",
    "train.system.logging.log_interval=5",
]  # fmt: skip
# The task YAML each model's overrides are written for (upstream's train.yaml may default to another size).
TASKS = {"aquila": "7b", "deepseek_v3": "16b_a3b", "mixtral": "8x7b", "qwen3": "30b_a3b", "llama3": "8b"}
# What reaches metrics.jsonl beyond the loss.
EXPECTED_FIELDS = {
    "aquila": set(),
    "deepseek_v3": {"moe_seq_load_balancing_loss", "mtp_loss"},
    "mixtral": {"moe_load_balancing_loss"},
    "qwen3": {"moe_load_balancing_loss"},
    "llama3": set(),
}


def hf_tokenizer(data: Path, folder: str) -> list[str]:
    """A *TokenizerFS type reads a Hugging Face folder: `tokenizer` (Llama3TokenizerFS) or `qwen_tokenizer`
    (QwenTokenizerFS), with the corpora tokenized by that type."""
    prefix = data if folder == "tokenizer" else data / folder
    return [f"train.data.tokenizer.tokenizer_path={data}/{folder}",
            f"train.data.data_path=[0.7,{prefix}/stories_text_document,0.3,{prefix}/facts_text_document]"]  # fmt: skip


def moe(num_layers: int, experts: int = 4, topk: int = 2) -> list[str]:
    return [f"train.model.num_layers={num_layers}", f"train.model.num_experts={experts}",
            f"train.model.moe_router_topk={topk}", "train.model.ffn_hidden_size=128"]  # fmt: skip


def model_overrides(model: str, data: Path) -> list[str]:
    """The task-level overrides of one model (see TASKS)."""
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
    if model == "mixtral":  # a multi-host job on one host: tp=2 + sequence parallel, experts EP=2 (expert tp 1)
        return [
            *moe(2), "train.model.num_query_groups=2", "train.system.pipeline_model_parallel_size=1",
            "train.system.expert_model_parallel_size=2", "+train.system.expert_tensor_parallel_size=1",
            f"train.model.train_iters={ITERS}",
            "train.model.optimizer.lr=3e-3", "train.model.optimizer.lr_scheduler.lr_warmup_iters=4",
            "train.model.optimizer.lr_scheduler.lr_decay_iters=null",
            "train.model.eval_interval=20",
            "train.model.eval_iters=2", f"train.system.checkpoint.save_interval={ITERS}",
            "++experiment.runner.nnodes=1", "++experiment.runner.hostfile=null",
            *hf_tokenizer(data, "qwen_tokenizer"),
        ]  # fmt: skip
    if model == "qwen3":  # bf16, GQA, qk_layernorm, 8 experts top-2 (of 128 top-8), WSD
        return [
            *moe(2, experts=8), "train.model.kv_channels=16", "train.model.num_query_groups=2",
            "train.model.moe_ffn_hidden_size=32", f"train.model.train_iters={ITERS}",
            "train.system.pipeline_model_parallel_size=1", "train.system.expert_model_parallel_size=2",
            f"experiment.save_steps={ITERS}", *hf_tokenizer(data, "qwen_tokenizer"),
        ]  # fmt: skip
    if model == "llama3":  # bf16, GQA, tp=2 + sequence parallel; a finetune load (if any) is dropped
        return [
            "train.model.num_layers=2", "train.model.ffn_hidden_size=128", "train.model.num_query_groups=2",
            f"train.model.train_samples={ITERS * 8}", "train.model.eval_interval=20", "train.model.eval_iters=2",
            "train.model.optimizer.lr_scheduler.lr=3e-3", "train.model.optimizer.lr_scheduler.min_lr=3e-4",
            "train.system.tensor_model_parallel_size=2", "train.system.pipeline_model_parallel_size=1",
            "~train.system.checkpoint.load", "~train.system.checkpoint.finetune",
            f"train.system.checkpoint.save_interval={ITERS}", "++experiment.runner.nnodes=1",
            "++experiment.runner.hostfile=null", *hf_tokenizer(data, "tokenizer"),
        ]  # fmt: skip
    raise ValueError(f"no shrink overrides for {model!r}; known: {', '.join(TASKS)}")


def overrides(model: str, data: Path, exp_dir: Path) -> list[str]:
    """Everything after `--config-name train` that makes the model's train.yaml a CPU job in exp_dir."""
    return [f"train={TASKS[model]}", "action=test", f"experiment.exp_dir={exp_dir}", *ON_THIS_HOST, *TINY_MODEL,
            *model_overrides(model, data)]  # fmt: skip
