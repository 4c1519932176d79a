"""The auto-tuner on MoE models: expert parallel sizes in the search space (pruned by the shared layout
rules), the memory model's parameter count against the model Megatron-Core builds (one process, gloo,
local spec, as the training program builds it), expert sharding of the optimizer, routed-token
activations, and the cost model's expert-parallel terms."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from flagscale.auto_tuner import rules
from flagscale.auto_tuner.config import SpaceConfig
from flagscale.auto_tuner.cost import PROFILES, TERMS, terms
from flagscale.auto_tuner.memory import estimate, moe_activations, optimizer_bytes, stage_param_split
from flagscale.auto_tuner.space import Candidate, auto_range, generate
from flagscale.auto_tuner.workload import Workload, workload_from_task
from tests.conftest import REPO
from tests.unit.test_auto_tuner_rules import CURRENT

DATA = {"mock_data": True, "tokenizer_type": "NullTokenizer", "vocab_size": 1000, "train_iters": 10, "lr": 1e-3}
SWIGLU_MOE = {  # Mixtral/Qwen3-like: RMSNorm, no biases, qk norm, a dense first layer, a gated shared expert
    "num_layers": 3, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
    "group_query_attention": True, "num_query_groups": 2, "seq_length": 64, "max_position_embeddings": 64,
    "position_embedding_type": "rope", "normalization": "RMSNorm", "swiglu": True,
    "untie_embeddings_and_output_weights": True, "disable_bias_linear": True, "qk_layernorm": True,
    "num_experts": 4, "moe_ffn_hidden_size": 32, "moe_router_topk": 2, "moe_shared_expert_intermediate_size": 48,
    "moe_shared_expert_gate": True, "moe_layer_freq": "[0]+[1]*2",
}
GELU_MOE = {  # GPT-like: LayerNorm, biases, learned positions, tied embeddings, every 2nd layer MoE
    "num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4, "seq_length": 64,
    "max_position_embeddings": 64, "num_experts": 4, "moe_router_topk": 2, "moe_layer_freq": 2,
}
COUNT_PROGRAM = """
import sys, warnings
warnings.filterwarnings("ignore")
import json, torch, torch.distributed as dist
from flagscale.train import cpu_shims
cpu_shims.install()
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from flagscale.train.arguments import parse_args
from flagscale.train.model import build_chunks, transformer_config
from flagscale.train.runtime import Runtime
ps.initialize_model_parallel()
model_parallel_cuda_manual_seed(1)
runtime = Runtime(device=torch.device("cpu"), rank=0, world_size=1, tp_rank=0, pp_rank=0, dp_rank=0)
for argv in json.loads(sys.argv[2]):
    args = parse_args(argv, world_size=1)
    chunks = build_chunks(args, transformer_config(args, runtime), 1024)
    named = [(name, p.numel()) for chunk in chunks for name, p in chunk.named_parameters()]
    print("COUNT", json.dumps({"total": sum(n for _, n in named),
                               "expert": sum(n for name, n in named if ".local_experts." in name)}))
dist.destroy_process_group()
"""


def _argv(model: dict) -> list[str]:
    argv = []
    for key, value in {**model, **DATA}.items():
        option = "--" + key.replace("_", "-")
        argv += [option] if value is True else [option, str(value)]
    return argv


MODELS = {"swiglu-shared-pattern": SWIGLU_MOE, "gelu-bias-every-2nd": GELU_MOE}


@pytest.fixture(scope="module")
def real_counts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, int]]:
    """Parameters (total, routed experts) of each model as Megatron-Core builds it: one process, ~5 s."""
    store = tmp_path_factory.mktemp("count") / "store"
    argvs = json.dumps([_argv(model) for model in MODELS.values()])
    run = subprocess.run([sys.executable, "-c", COUNT_PROGRAM, str(store), argvs], cwd=REPO,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    counts = [json.loads(line[6:]) for line in run.stdout.splitlines() if line.startswith("COUNT ")]
    return dict(zip(MODELS, counts))


def moe_work(model: dict, world: int = 2) -> Workload:
    return workload_from_task({"model": {**model, **DATA}}, world)


def cand(**kw) -> Candidate:
    return Candidate(**{"dp": 2, "tp": 1, "pp": 1, "mbs": 4, **kw})


@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_count_matches_the_model_megatron_core_builds(name: str, real_counts: dict) -> None:
    """Built at ep 1 (one process); ep 2 then halves exactly the routed experts (hand arithmetic)."""
    real = real_counts[name]
    work = dataclasses.replace(moe_work(MODELS[name], 1), vocab_size=1024, make_vocab_size_divisible_by=128)
    dense, expert = stage_param_split(cand(dp=1), work, 0)
    assert (dense + expert, expert) == (real["total"], real["expert"])
    two = dataclasses.replace(work, world_size=2)
    assert stage_param_split(cand(dp=1, ep=2), two, 0) == (dense, expert / 2)


def test_workload_reads_the_moe_arguments() -> None:
    work = moe_work({**SWIGLU_MOE, "moe_token_dispatcher_type": "alltoall", "expert_tensor_parallel_size": 1})
    assert (work.num_experts, work.moe_ffn_hidden_size, work.moe_router_topk) == (4, 32, 2)
    assert work.moe_layers() == [False, True, True] and work.moe_layer_freq == (0, 1, 1)
    assert work.moe_shared_expert_intermediate_size == 48 and work.moe_shared_expert_gate and work.qk_layernorm
    assert work.moe_token_dispatcher_type == "alltoall" and work.expert_tp(2) == 1
    gelu = moe_work(GELU_MOE)
    assert gelu.moe_layers() == [True, False, True, False] and gelu.moe_ffn_hidden_size == 96
    assert gelu.expert_tp(2) == 2  # unset: follows each candidate's tp
    assert moe_work({k: v for k, v in GELU_MOE.items() if k not in ("num_experts", "moe_router_topk",
                                                                    "moe_layer_freq")}).moe_layers() == [False] * 4


def test_space_searches_ep_and_the_shared_rules_prune_invalid_sizes() -> None:
    work = dataclasses.replace(moe_work(GELU_MOE, world=4), num_experts=6)
    assert auto_range("expert_model_parallel_size", work) == [1, 2]  # divisors of 6 that divide 4
    assert auto_range("expert_model_parallel_size", moe_work(GELU_MOE, 2)) == [1, 2]
    dense = dataclasses.replace(work, num_experts=None)
    assert auto_range("expert_model_parallel_size", dense) == [1]
    space = SpaceConfig(tensor_model_parallel_size=[1], pipeline_model_parallel_size=[1, 4], micro_batch_size=[1],
                        expert_model_parallel_size=[1, 2, 4])
    candidates = generate(space, work, {**CURRENT, "data_parallel_size": 4})
    assert sorted({c.ep for c in candidates}) == [1, 2, 4]
    verdicts = {(c.ep, c.pp): rules.check(c, work) for c in candidates}
    assert verdicts[(1, 1)] == verdicts[(2, 1)] == verdicts[(1, 4)] == []
    assert "num_experts (6) is not divisible by expert_model_parallel_size (4)" in verdicts[(4, 1)]
    assert ("expert_model_parallel_size (2) × expert_tensor_parallel_size (1) × pipeline_model_parallel_size (4) "
            "= 8 does not divide the world size 4") in verdicts[(2, 4)]
    trial = next(c for c in candidates if c.ep == 2 and c.pp == 1)
    assert trial.train_values(True)["expert_model_parallel_size"] == 2 and "ep2" in trial.describe()


def test_expert_tensor_parallel_size_of_the_job_enters_the_rules() -> None:
    work = dataclasses.replace(moe_work(GELU_MOE, world=4), expert_tensor_parallel_size=4)
    assert any("= 8 does not divide the world size 4" in p for p in rules.check(cand(dp=4, ep=2), work))


def test_distributed_optimizer_shards_experts_over_the_expert_data_parallel_group() -> None:
    work = moe_work(GELU_MOE, world=4)
    c = cand(dp=4, ep=2, dist_opt=True)  # expert data parallel: 4 / (ep 2 × etp 1 × pp 1) = 2
    assert optimizer_bytes(c, work)[2] == 8 / 4 and optimizer_bytes(c, work, expert=True)[2] == 8 / 2
    dense, expert = stage_param_split(c, work, 0)
    assert estimate(c, work).stages[0].optimizer == pytest.approx(dense * 2 + expert * 4)


def test_ep_and_topk_move_the_estimate() -> None:
    work = moe_work(SWIGLU_MOE, world=2)
    assert estimate(cand(ep=2), work).peak_mb < estimate(cand(), work).peak_mb
    top1 = dataclasses.replace(work, moe_router_topk=1)
    assert moe_activations(cand(), top1) < moe_activations(cand(), work)
    # routed rows: top-k × tokens (4 × 64) × (2 × hidden + gated fc1 out, SiLU, product: 4 × 32), fp32
    routed = 2 * 4 * 64 * 4 * (2 * 64 + 4 * 32)
    assert moe_activations(cand(), work) == routed + 2 * 4 * 64 * 4 * 4 + 4 * 64 * 48 * 4 * 4


def test_cost_model_charges_ep_for_token_exchange_and_credits_its_gradient_sync() -> None:
    work, cpu = moe_work(SWIGLU_MOE, world=2), PROFILES["cpu"]
    plain, split = dict(zip(TERMS, terms(cand(), work, cpu))), dict(zip(TERMS, terms(cand(ep=2), work, cpu)))
    assert plain["ep_comm"] == 0 < split["ep_comm"]
    assert split["dp_comm"] < plain["dp_comm"] and split["overhead"] < plain["overhead"]
    assert split["compute"] == plain["compute"]  # balanced routing: ep moves tokens, not work
    a2a = dataclasses.replace(work, moe_token_dispatcher_type="alltoall")
    assert terms(cand(ep=2), a2a, cpu)[-1] == pytest.approx(split["ep_comm"] * work.moe_router_topk / 2, rel=0.3)
    dense = dataclasses.replace(work, num_experts=None)
    assert terms(cand(), dense, cpu)[-1] == 0
