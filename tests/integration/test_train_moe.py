"""Mixture-of-experts, multi-latent attention and multi-token prediction trained for real: tiny
DeepSeek-V3-, Mixtral- and Qwen3-like models under torchrun (2 CPU processes, gloo) on the tiny example
data. Losses fall, the router and MTP losses reach metrics.jsonl, both token dispatchers give the same
training, expert parallelism resumes exactly, tensor + sequence parallelism trains as one process does,
the expert bias moves, and an uneven pipeline carries MTP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.test_train_program import data_args, events, single_process, torchrun, train_losses

pytestmark = pytest.mark.integration

COMMON = [
    "--seq-length", "64", "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--attention-dropout", "0",
    "--hidden-dropout", "0", "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "3e-3",
    "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--num-workers", "0",
    "--eval-interval", "1000", "--eval-iters", "1", "--split", "98,1,1",
]  # fmt: skip
DEEPSEEK_V3 = [
    *COMMON, "--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
    "--qk-layernorm", "--multi-latent-attention", "--q-lora-rank", "32", "--kv-lora-rank", "16",
    "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16",
    "--num-experts", "4", "--moe-ffn-hidden-size", "32", "--moe-shared-expert-intermediate-size", "64",
    "--moe-layer-freq", "[0]+[1]*2", "--moe-router-topk", "2", "--moe-router-score-function", "sigmoid",
    "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.01",
    "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "0.02",
    "--moe-router-num-groups", "2", "--moe-router-group-topk", "1", "--moe-router-topk-scaling-factor", "2.5",
    "--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "0.3",
]  # fmt: skip
MIXTRAL = [
    *COMMON, "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
    "--num-query-groups", "2", "--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.02",
    "--moe-router-load-balancing-type", "aux_loss",
]  # fmt: skip
QWEN3 = [
    *COMMON, "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--kv-channels", "32",
    "--group-query-attention", "--num-query-groups", "2", "--qk-layernorm", "--num-experts", "4",
    "--moe-ffn-hidden-size", "32", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.001",
    "--moe-token-dispatcher-type", "alltoall",
]  # fmt: skip
EXPERT_PARALLEL = ["--expert-model-parallel-size", "2"]


def moe_fields(metrics: list[dict]) -> dict[int, dict]:
    """The MoE/MTP fields of each train event, by iteration."""
    return {e["iteration"]: {k: v for k, v in e.items() if k.startswith(("moe_", "mtp_"))}
            for e in metrics if e["event"] == "train"}  # fmt: skip


@pytest.mark.slow
def test_deepseek_v3_like_trains_and_resumes_exactly(tiny_data: Path, tmp_path: Path) -> None:
    """MLA + MoE (shared expert, sigmoid router, expert bias, group-limited routing) + MTP, EP=2 with
    the alltoall dispatcher: a run stopped at 4 and resumed matches one run to 8, MTP loss included."""
    common = [*DEEPSEEK_V3, *data_args(tiny_data), *EXPERT_PARALLEL, "--moe-token-dispatcher-type", "alltoall",
              "--train-iters", "8", "--log-interval", "2"]  # fmt: skip
    whole = torchrun(*common, "--metrics-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stdout[-3000:]
    split = [*common, "--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt"),
             "--metrics-dir", str(tmp_path / "split")]  # fmt: skip
    assert torchrun(*split, "--exit-interval", "4").returncode == 0
    resumed = torchrun(*split)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resuming from checkpoint {tmp_path / 'ckpt' / 'iter_0000004'} at iteration 4" in resumed.stdout
    expected, got = events(tmp_path / "whole"), events(tmp_path / "split")
    losses = train_losses(expected)
    assert sorted(losses) == [2, 4, 6, 8] and losses[8] < losses[2] - 0.5, losses
    assert train_losses(got) == pytest.approx(losses, rel=1e-6)
    aux = moe_fields(expected)
    assert set(aux[8]) == {"moe_seq_load_balancing_loss", "moe_seq_load_balancing_loss_per_layer", "mtp_loss",
                           "mtp_loss_per_layer"}  # fmt: skip
    assert len(aux[8]["moe_seq_load_balancing_loss_per_layer"]) == 3  # two MoE decoder layers + the MTP layer
    assert aux[8]["mtp_loss"] > losses[8] - 1 and aux[8]["mtp_loss"] < aux[2]["mtp_loss"]
    resumed_aux = moe_fields(got)[8]
    for name, value in aux[8].items():
        assert resumed_aux[name] == pytest.approx(value, rel=1e-6), name
    assert "| moe seq load balancing loss " in whole.stdout and "| mtp loss " in whole.stdout


@pytest.mark.slow
def test_mixtral_like_dispatchers_train_the_same(tiny_data: Path, tmp_path: Path) -> None:
    """Top-2 softmax router with EP=2: allgather and alltoall (gloo) give the same training."""
    losses = {}
    for dispatcher in ("allgather", "alltoall"):
        run = torchrun(*MIXTRAL, *data_args(tiny_data), *EXPERT_PARALLEL, "--train-iters", "20",
                       "--log-interval", "5", "--moe-token-dispatcher-type", dispatcher,
                       "--metrics-dir", str(tmp_path / dispatcher))  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:]
        metrics = events(tmp_path / dispatcher)
        losses[dispatcher] = train_losses(metrics)
        assert 0.9 < moe_fields(metrics)[20]["moe_load_balancing_loss"] < 2.0
    assert losses["allgather"][20] < losses["allgather"][5] - 1.0, losses
    assert losses["alltoall"] == pytest.approx(losses["allgather"], rel=1e-5)


@pytest.mark.slow
def test_mixtral_like_tensor_and_sequence_parallel_trains_like_one_process(tiny_data: Path, tmp_path: Path) -> None:
    """tp=2 + sequence parallelism (what Megatron-Core's MoE layer needs for tp > 1; on the CPU the torch
    norms take it through cpu_shims) gives the single-process run's losses, gradient and router-loss values."""
    common = [*MIXTRAL, *data_args(tiny_data), "--train-iters", "10", "--log-interval", "2"]
    one = single_process(*common, "--metrics-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    tp_sp = torchrun(*common, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                     "--metrics-dir", str(tmp_path / "tp_sp"))  # fmt: skip
    assert tp_sp.returncode == 0, tp_sp.stdout[-3000:]
    expected, got = events(tmp_path / "one"), events(tmp_path / "tp_sp")
    assert next(e for e in got if e["event"] == "start")["tp"] == 2
    losses = train_losses(expected)
    assert sorted(losses) == [2, 4, 6, 8, 10] and losses[10] < losses[2] - 0.5, losses
    assert train_losses(got) == pytest.approx(losses, rel=1e-6)
    for name in ("grad_norm", "moe_load_balancing_loss"):
        values = {e["iteration"]: e[name] for e in expected if e["event"] == "train"}
        assert {e["iteration"]: e[name] for e in got if e["event"] == "train"} == pytest.approx(values, rel=1e-5)


def test_qwen3_like_gqa_qk_layernorm_moe(tiny_data: Path, tmp_path: Path) -> None:
    """GQA + qk_layernorm + 128-wide heads (kv_channels) with experts split over 2 ranks."""
    run = torchrun(*QWEN3, *data_args(tiny_data), *EXPERT_PARALLEL, "--train-iters", "20", "--log-interval", "5",
                   "--metrics-dir", str(tmp_path / "m"))  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    metrics = events(tmp_path / "m")
    losses = train_losses(metrics)
    assert losses[20] < losses[5] - 1.0, losses
    assert set(moe_fields(metrics)[20]) == {"moe_load_balancing_loss", "moe_load_balancing_loss_per_layer"}


def test_uneven_pipeline_carries_mtp_on_the_last_stage(tiny_data: Path, tmp_path: Path) -> None:
    """pp=2 with one layer on the first stage: the dense first layer alone, two MoE layers and MTP on the last."""
    run = torchrun(*DEEPSEEK_V3, *data_args(tiny_data), "--pipeline-model-parallel-size", "2",
                   "--decoder-first-pipeline-num-layers", "1", "--train-iters", "10", "--log-interval", "5",
                   "--metrics-dir", str(tmp_path / "m"))  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    metrics = events(tmp_path / "m")
    assert train_losses(metrics)[10] < train_losses(metrics)[5]
    assert {"mtp_loss", "moe_seq_load_balancing_loss"} <= set(moe_fields(metrics)[10])


EXPERT_BIAS_PROGRAM = """
import json, sys, warnings
warnings.filterwarnings("ignore")
from flagscale.train.arguments import parse_args
from flagscale.train.runtime import initialize, shutdown
from flagscale.train.trainer import build_trainer
args = parse_args(sys.argv[1:], world_size=1)
trainer, start = build_trainer(args, initialize(args))
trainer.run(start)
routers = [m for m in trainer.model[0].modules() if getattr(m, "expert_bias", None) is not None]
print("BIASES", json.dumps([m.expert_bias.tolist() for m in routers]))
shutdown()
"""


def test_expert_bias_is_updated_by_the_training_loop(tiny_data: Path) -> None:
    """Megatron-Core's finalize_model_grads moves each router's expert bias by ±rate per step."""
    run = subprocess.run(
        [sys.executable, "-c", EXPERT_BIAS_PROGRAM, *DEEPSEEK_V3, *data_args(tiny_data), "--train-iters", "3",
         "--log-interval", "3"], cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    biases = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("BIASES "))[7:])
    assert len(biases) == 3  # two MoE decoder layers + the MTP layer
    for bias in biases:  # three updates of ±0.01 each: an odd multiple of 0.01 unless an expert was exactly balanced
        assert all(abs(b) < 0.031 for b in bias) and any(abs(b) > 0.005 for b in bias), biases


MLA_ATTENTION_PROGRAM = """
import sys, warnings
warnings.filterwarnings("ignore")
import torch, torch.distributed as dist, torch.nn.functional as F
from flagscale.train import cpu_shims
cpu_shims.install()
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import MLATransformerConfig
from megatron.core.transformer.enums import AttnMaskType
ps.initialize_model_parallel()
model_parallel_cuda_manual_seed(1)
config = MLATransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, qk_head_dim=16,
                              qk_pos_emb_head_dim=8, v_head_dim=12, attention_dropout=0.0,
                              use_cpu_initialization=True, masked_softmax_fusion=False)
attention = cpu_shims.LocalMLACoreAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                            attention_type="self", softmax_scale=0.3, k_channels=24, v_channels=12)
q, k, v = torch.randn(10, 2, 4, 24), torch.randn(10, 2, 4, 24), torch.randn(10, 2, 4, 12)
out = attention(q, k, v, None)
ref = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True, scale=0.3)
print("MAXDIFF", (out - ref.permute(2, 0, 1, 3).reshape(10, 2, 48)).abs().max().item(), tuple(out.shape))
dist.destroy_process_group()
"""


def test_local_mla_core_attention_is_exact(tmp_path: Path) -> None:
    """The local core attention for MLA (query/key heads 24 wide, value heads 12) equals torch's SDPA."""
    run = subprocess.run([sys.executable, "-c", MLA_ATTENTION_PROGRAM, str(tmp_path / "store")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    _, diff, *shape = next(line for line in run.stdout.splitlines() if line.startswith("MAXDIFF ")).split(" ", 2)
    assert float(diff) < 1e-5 and shape == ["(10, 2, 48)"]
