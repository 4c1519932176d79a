"""The search space and the tuner's validity check (the shared layout rules applied to candidates):
a rejected and an accepted candidate per rule, the folding of settings that change nothing, the
tiny space's candidates, and agreement with the training program's own argument check."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from flagscale.auto_tuner import rules
from flagscale.auto_tuner.config import SpaceConfig
from flagscale.auto_tuner.space import Candidate, canonical, generate
from flagscale.auto_tuner.workload import Workload, program_problems
from tests.conftest import REPO

TINY = Workload(world_size=2, num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=2,
                num_query_groups=2, kv_channels=32, seq_length=64, vocab_size=929, make_vocab_size_divisible_by=128,
                global_batch_size=16, swiglu=True, untie_embeddings=True, learned_positions=False, rope=True,
                add_bias=False,
                layernorm=False)
CURRENT = {"data_parallel_size": 2, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
           "context_parallel_size": 1, "expert_model_parallel_size": 1, "sequence_parallel": False,
           "num_layers_per_virtual_pipeline_stage": None, "micro_batch_size": 4, "recompute_granularity": None,
           "recompute_method": None, "recompute_num_layers": None, "use_distributed_optimizer": False}
TEST_SPACE = SpaceConfig(tensor_model_parallel_size=[1, 2], pipeline_model_parallel_size=[1, 2],
                         micro_batch_size=[1, 2, 4, 8], recompute_granularity=[None, "full"])


def cand(**kw) -> Candidate:
    base = {"dp": 2, "tp": 1, "pp": 1, "mbs": 4}
    return Candidate(**{**base, **kw})


def work(**kw) -> Workload:
    return dataclasses.replace(TINY, **kw)


@pytest.mark.parametrize(
    ("candidate", "workload", "message"),
    [
        (cand(dp=1), TINY, "= 1 is not the world size 2"),
        (cand(dp=1, tp=2), work(num_attention_heads=3, num_query_groups=3),
         "num_attention_heads (3) is not divisible by tensor_model_parallel_size (2)"),
        (cand(dp=1, tp=2), work(num_query_groups=1), "num_query_groups (1) is not divisible"),
        (cand(dp=1, tp=2), work(ffn_hidden_size=175), "ffn_hidden_size (175) is not divisible"),
        (cand(mbs=3), TINY, "global_batch_size (16) is not divisible by micro_batch_size (3) × data parallel size (2)"),
        (cand(dp=1, pp=2), work(num_layers=3), "num_layers (3) is not divisible by pipeline_model_parallel_size (2)"),
        (cand(dp=1, pp=2), work(num_layers=1), "num_layers (1) is not divisible"),
        (cand(dp=1, pp=2), work(num_layers=5, first_stage_layers=1, last_stage_layers=3),
         "leaves 1 layers for 0 middle stage(s)"),
        (cand(dp=1, tp=2, sp=True), work(seq_length=63), "sequence_parallel needs seq_length (63) divisible"),
        (cand(dp=1, cp=2), work(seq_length=66), "seq_length (66) is not divisible by 2 × context_parallel_size"),
        (cand(dp=1, cp=2), TINY, "needs TransformerEngine attention"),
        (cand(vpp_layers=1), TINY, "need pipeline_model_parallel_size > 1"),
        (cand(dp=1, pp=2, vpp_layers=3), work(num_layers=8),
         "layers per pipeline stage (4) is not divisible by num_layers_per_virtual_pipeline_stage (3)"),
        (cand(dp=1, pp=2, vpp_layers=1, mbs=16), work(num_layers=4), "= 1) divisible by pipeline_model_parallel_size"),
        (cand(ep=2), TINY, "needs a model with experts"),
        (cand(ep=2), work(num_experts=3), "num_experts (3) is not divisible by expert_model_parallel_size (2)"),
        (cand(ep=4), work(num_experts=4), "= 4 does not divide the world size 2"),
        (cand(), work(overlap_param_gather=True), "overlap_param_gather needs use_distributed_optimizer"),
    ],
)
def test_invalid_candidates_are_rejected_with_a_reason(candidate: Candidate, workload: Workload, message: str) -> None:
    assert any(message in reason for reason in rules.check(candidate, workload)), rules.check(candidate, workload)


@pytest.mark.parametrize(
    ("candidate", "workload"),
    [
        (cand(), TINY),
        (cand(dp=1, tp=2, sp=True), TINY),
        (cand(dp=1, tp=2, sp=True), work(device="cpu")),  # the CPU shims let the torch norms take it
        (cand(sp=True), TINY),  # tp 1: Megatron switches sequence parallelism off, the layout stays valid
        (cand(dp=1, pp=2, vpp_layers=1, mbs=8), work(num_layers=4)),
        (cand(dp=1, pp=2, recompute="full", recompute_method="uniform", recompute_layers=1), TINY),
        (cand(dist_opt=True, recompute="selective"), TINY),
        (cand(dist_opt=True), work(overlap_param_gather=True)),
        (cand(ep=2), work(num_experts=4)),
        (cand(dp=1, pp=2), work(num_layers=5, first_stage_layers=2)),
    ],
)
def test_valid_candidates_pass_every_rule(candidate: Candidate, workload: Workload) -> None:
    assert rules.check(candidate, workload) == []


@pytest.mark.parametrize(
    ("candidate", "workload", "plain"),
    [
        (cand(sp=True), TINY, cand()),
        (cand(dp=1, tp=2, dist_opt=True), TINY, cand(dp=1, tp=2)),
        (cand(dp=1, pp=2, vpp_layers=2), work(num_layers=4), cand(dp=1, pp=2)),
        (cand(dp=1, pp=2, recompute="full", recompute_method="block", recompute_layers=2), TINY,
         cand(dp=1, pp=2, recompute="full", recompute_method="block", recompute_layers=1)),
        (cand(dp=1, tp=2, sp=True, dist_opt=False), TINY, cand(dp=1, tp=2, sp=True)),  # already plain
    ],
)
def test_settings_that_change_nothing_are_folded(candidate: Candidate, workload: Workload, plain: Candidate) -> None:
    assert canonical(candidate, workload) == plain


def test_rules_import_without_torch() -> None:
    code = "import sys, flagscale.auto_tuner.rules, flagscale.config.layout; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_tiny_space_has_24_valid_candidates() -> None:
    candidates = generate(TEST_SPACE, TINY, CURRENT)
    valid = [c for c in candidates if not rules.check(c, TINY)]
    assert len(candidates) == len(valid) == 24  # (tp,pp) ∈ {(1,1),(2,1),(1,2)} × 4 mbs × recompute off/full
    assert {(c.dp, c.tp, c.pp) for c in valid} == {(2, 1, 1), (1, 2, 1), (1, 1, 2)}
    full = [c for c in valid if c.recompute == "full"]
    assert {(c.recompute_method, c.recompute_layers) for c in full} == {("uniform", 1)}  # the defaults filled in


def test_auto_ranges_and_derived_dp() -> None:
    space = SpaceConfig(micro_batch_size="auto", use_distributed_optimizer="auto", sequence_parallel="auto")
    world4 = work(world_size=4, global_batch_size=8, num_attention_heads=4, num_query_groups=4)
    candidates = generate(space, world4, CURRENT)
    assert {c.mbs for c in candidates} == {1, 2, 4, 8}
    assert all(c.dp * c.tp * c.pp == 4 for c in candidates)
    valid = [c for c in candidates if not rules.check(c, world4)]
    assert not [c for c in valid if c.sp and c.tp == 1] and not [c for c in valid if c.dist_opt and c.dp == 1]
    assert {(c.tp, c.pp) for c in valid} == {(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)}  # pp 4 > 2 layers


def test_explicit_dp_list_filters_layouts() -> None:
    space = SpaceConfig(data_parallel_size=[2], tensor_model_parallel_size=[1, 2], micro_batch_size=[4])
    assert {c.tp for c in generate(space, TINY, CURRENT)} == {1}


def test_rules_agree_with_the_training_program(tmp_path) -> None:
    """Every candidate the rules accept is accepted by train/arguments.validate as a trial config."""
    task = {"system": {"tensor_model_parallel_size": 1}, "model": {
        "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 176, "num_attention_heads": 2, "seq_length": 64,
        "global_batch_size": 16, "train_iters": 10, "lr": 1e-3, "swiglu": True},
        "data": {"mock_data": True, "tokenizer_type": "NullTokenizer", "vocab_size": 929}}
    from flagscale.auto_tuner.trial import set_leaf

    for c in generate(TEST_SPACE, TINY, CURRENT):
        trial = {k: dict(v) for k, v in task.items()}
        for key, value in c.train_values(False).items():
            set_leaf(trial, key, value)
        assert program_problems(trial, 2) == [], c.key
    broken = {k: dict(v) for k, v in task.items()}
    set_leaf(broken, "micro_batch_size", 3)
    assert any("global_batch_size (16) is not divisible" in p for p in program_problems(broken, 2))
