"""The memory estimate: parameter counts match the model the training program builds, each knob
moves the estimate the way Megatron's memory behaves, and a small budget prunes exactly the
candidates that do not fit."""

from __future__ import annotations

import dataclasses

import pytest

from flagscale.auto_tuner.memory import MB, estimate, in_flight, optimizer_bytes, stage_layers, stage_params
from flagscale.auto_tuner.space import Candidate, generate
from tests.unit.test_auto_tuner_rules import CURRENT, TEST_SPACE, TINY


def cand(**kw) -> Candidate:
    return Candidate(**{"dp": 2, "tp": 1, "pp": 1, "mbs": 4, **kw})


def test_parameter_count_matches_the_program() -> None:
    # flagscale/train prints "231,744 parameters on rank 0" for this model at tp1 pp1 (vocab 929 padded to 1024)
    assert stage_params(cand(), TINY, 0) == 231_744
    # tp2 splits every matrix and the vocabulary (padded to 256 per rank pair): norms stay whole
    assert stage_params(cand(dp=1, tp=2), TINY, 0) == (231_744 - 2 * 128 - 64) / 2 + 2 * 128 + 64
    # pp2: stage 0 has the embedding and one layer, stage 1 one layer, final norm, output layer
    first, last = stage_params(cand(dp=1, pp=2), TINY, 0), stage_params(cand(dp=1, pp=2), TINY, 1)
    assert first + last == 231_744


def test_bytes_per_parameter_by_precision_and_distributed_optimizer() -> None:
    assert optimizer_bytes(cand(), TINY) == (4, 4, 8.0)  # fp32: weight, grad buffer, Adam moments
    bf16 = dataclasses.replace(TINY, precision="bf16")
    assert optimizer_bytes(cand(), bf16) == (2, 2, 16.0)  # + fp32 master weights and their fp32 grads
    assert optimizer_bytes(cand(), dataclasses.replace(bf16, grads_in_fp32=True)) == (2, 4, 12.0)  # Megatron's 18
    assert optimizer_bytes(cand(dist_opt=True), dataclasses.replace(bf16, grads_in_fp32=True)) == (2, 4, 6.0)


@pytest.mark.parametrize(
    ("smaller", "larger"),
    [
        (cand(mbs=2), cand(mbs=4)),
        (cand(recompute="full", recompute_method="uniform", recompute_layers=1), cand()),
        (cand(recompute="selective"), cand()),
        (cand(dist_opt=True), cand()),
        (cand(dp=1, tp=2), cand(dp=1, tp=2, mbs=8)),
        (cand(dp=1, tp=2, sp=True), cand(dp=1, tp=2)),
        (cand(dp=1, tp=2), cand()),
    ],
)
def test_each_knob_moves_the_estimate(smaller: Candidate, larger: Candidate) -> None:
    assert estimate(smaller, TINY).peak_mb < estimate(larger, TINY).peak_mb


def test_pipeline_in_flight_micro_batches() -> None:
    four = dataclasses.replace(TINY, num_layers=8)
    c = cand(dp=1, pp=4, mbs=1)  # 16 micro batches: 1F1B keeps pp - stage in flight
    assert [in_flight(c, four, s) for s in range(4)] == [4, 3, 2, 1]
    assert in_flight(cand(dp=1, pp=4, mbs=8), four, 0) == 2  # only 2 micro batches exist
    interleaved = cand(dp=1, pp=2, mbs=1, vpp_layers=2)  # 2 chunks per rank: Megatron's warm-up (p-1)*2+(v-1)*p+1
    assert in_flight(interleaved, four, 0) == 5
    assert stage_layers(dataclasses.replace(TINY, num_layers=7, first_stage_layers=1), 4) == [1, 2, 2, 2]


def test_baseline_is_added_once_per_process() -> None:
    assert estimate(cand(), TINY, baseline_mb=400).peak_mb == pytest.approx(estimate(cand(), TINY).peak_mb + 400)


def test_small_budget_prunes_exactly_the_candidates_that_do_not_fit() -> None:
    """6.2 MB per process (on top of a 400 MB baseline) for the 24-candidate tiny space."""
    estimates = {c: estimate(c, TINY, baseline_mb=400).peak_mb for c in generate(TEST_SPACE, TINY, CURRENT)}
    pruned = {c.describe() for c, mb in estimates.items() if mb > 406.2}
    assert pruned == PRUNED_AT_6_2_MB
    assert max(estimates.values()) - 400 == pytest.approx(estimate(cand(mbs=8), TINY).stages[0].total / MB)


PRUNED_AT_6_2_MB = {
    # the unsplit model (dp2): only mbs 1 fits, and mbs 2 with recompute
    "dp2 tp1 pp1 mbs2", "dp2 tp1 pp1 mbs4", "dp2 tp1 pp1 mbs4 rc-uniform1", "dp2 tp1 pp1 mbs8",
    "dp2 tp1 pp1 mbs8 rc-uniform1",
    # tp2 halves most of it: up to mbs 4; mbs 8 not even with recompute (the logits stay)
    "dp1 tp2 pp1 mbs8", "dp1 tp2 pp1 mbs8 rc-uniform1",
    # pp2: the last stage's logits dominate; mbs 4 fits only with recompute
    "dp1 tp1 pp2 mbs4", "dp1 tp1 pp2 mbs8", "dp1 tp1 pp2 mbs8 rc-uniform1",
}
