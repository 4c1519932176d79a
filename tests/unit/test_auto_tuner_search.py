"""Search order, pruning by history and the early-stop rule, with made-up trial outcomes."""

from __future__ import annotations

import dataclasses

import pytest

from flagscale.auto_tuner.cost import PROFILES, Predictor, distance, terms
from flagscale.auto_tuner.history import TrialResult, TrialStatus
from flagscale.auto_tuner.search import Search, needs_more_memory
from flagscale.auto_tuner.space import Candidate, generate
from tests.unit.test_auto_tuner_rules import CURRENT, TEST_SPACE, TINY

SPACE = generate(TEST_SPACE, TINY, CURRENT)
FULL = {"recompute": "full", "recompute_method": "uniform", "recompute_layers": 1}


def cand(**kw) -> Candidate:
    return Candidate(**{"dp": 2, "tp": 1, "pp": 1, "mbs": 4, **kw})


def result(c: Candidate, status: TrialStatus = TrialStatus.OK, ms: float | None = None, trial: int = 1) -> TrialResult:
    return TrialResult(trial=trial, candidate=c, status=status, step_time_ms=ms,
                       tokens_per_s=16 * 64 / ms * 1000 if ms else None)


def search(margin: float = 0.15) -> Search:
    return Search(SPACE, Predictor(TINY, PROFILES["cpu"]), margin)


@pytest.mark.parametrize(
    ("b", "a", "expected"),
    [
        (cand(mbs=8), cand(mbs=4), True),
        (cand(mbs=2), cand(mbs=4), False),
        (cand(), cand(**FULL), True),  # no recompute needs more than full recompute
        (cand(**FULL), cand(), False),
        (cand(mbs=8), cand(mbs=4, recompute="selective"), True),
        (cand(dp=2, tp=1), cand(dp=1, tp=2), True),  # less model parallel, same micro batch
        (cand(dp=1, pp=2, mbs=8), cand(dp=1, tp=2, mbs=4), False),  # pp 2 > pp 1: not comparable
        (cand(), cand(dist_opt=True), True),
        (cand(dist_opt=True), cand(), False),
        (cand(), cand(), False),  # not strictly larger
        (cand(recompute="full", recompute_method="block", recompute_layers=1),
         cand(recompute="full", recompute_method="block", recompute_layers=2), True),
        (cand(**FULL), cand(recompute="full", recompute_method="block", recompute_layers=1), False),
    ],
)
def test_needs_more_memory(b: Candidate, a: Candidate, expected: bool) -> None:
    assert needs_more_memory(b, a) is expected


def test_oom_prunes_every_strictly_larger_candidate() -> None:
    s = search()
    oom = cand(dp=1, tp=2, mbs=4, **FULL)
    results = {oom.key: result(oom, TrialStatus.OOM, trial=3)}
    left = s.remaining(results)
    pruned = {c.describe() for c in SPACE if c.key in s.fates}
    assert pruned == {"dp1 tp2 pp1 mbs8 rc-uniform1", "dp1 tp2 pp1 mbs4", "dp1 tp2 pp1 mbs8",
                      "dp2 tp1 pp1 mbs4 rc-uniform1", "dp2 tp1 pp1 mbs8 rc-uniform1", "dp2 tp1 pp1 mbs4",
                      "dp2 tp1 pp1 mbs8"}
    assert all("trial 3" in s.fates[c.key] for c in SPACE if c.key in s.fates)
    assert len(left) == len(SPACE) - 1 - len(pruned)


def test_a_failure_is_not_retried_and_prunes_nothing_else() -> None:
    s = search()
    failed = cand(mbs=8)
    results = {failed.key: result(failed, TrialStatus.FAILED)}
    assert failed not in s.remaining(results)
    assert len(s.remaining(results)) == len(SPACE) - 1 and not s.fates


def test_first_trial_is_the_cost_model_favourite_not_grid_order() -> None:
    step = search().next({})
    grid_first = sorted(SPACE, key=lambda c: c.key)[0]
    assert step.candidate is not None and step.candidate != grid_first
    assert step.candidate.mbs == 8 and step.candidate.recompute is None  # fewest micro batches, no recompute


def test_early_stop_rule() -> None:
    """Once every layout is measured, a candidate predicted slower than best × (1 + margin) is skipped."""
    s = search(margin=0.15)
    fast = {cand(mbs=8): 10.0, cand(dp=1, tp=2, mbs=8): 40.0, cand(dp=1, pp=2, mbs=8): 40.0}
    results = {c.key: result(c, ms=ms, trial=i) for i, (c, ms) in enumerate(fast.items(), 1)}
    step = s.next(results)
    best_ms = 10.0
    for c in s.remaining(results):
        plausible = s.predictor.predict(c) * 1000 / 1.15 <= best_ms
        assert (c.key in s.fates) is not plausible
    if step.candidate is None:
        assert step.stop_reason.startswith("early stop")
    else:
        assert s.predictor.predict(step.candidate) * 1000 / 1.15 <= best_ms


def test_every_layout_is_scouted_before_stopping() -> None:
    s = search(margin=0.0)
    only = cand(mbs=8)
    results = {only.key: result(only, ms=1.0)}  # absurdly fast: nothing else is plausible on the prediction
    seen = set()
    while (step := s.next(results)).candidate is not None:
        c = step.candidate
        seen.add((c.tp, c.pp))
        results[c.key] = result(c, ms=50.0, trial=len(results) + 1)
    assert seen == {(2, 1), (1, 2)} and len(results) == 3  # one scout per other layout, then stop


def test_predictor_fit_learns_from_trials() -> None:
    """Step times from a different 'machine' (terms weighted 3, 0.3, 5, 1, 1): the fit gets closer."""
    weights = (3.0, 0.3, 5.0, 1.0, 1.0)

    def truth(c: Candidate) -> float:
        return 0.01 + sum(w * t for w, t in zip(weights, terms(c, TINY, PROFILES["cpu"])))

    predictor = Predictor(TINY, PROFILES["cpu"])
    sample = [c for c in SPACE if c.mbs in (2, 8) and c.recompute is None]
    before = sum(abs(predictor.model_time(c) / truth(c) - 1) for c in SPACE)
    predictor.fit({c: truth(c) for c in sample})
    after = sum(abs(predictor.model_time(c) / truth(c) - 1) for c in SPACE)
    assert after < before / 2
    assert all(predictor.predict(c) == truth(c) for c in sample)


def test_search_finds_the_optimum_of_a_synthetic_machine_in_half_the_trials() -> None:
    weights = (2.0, 0.5, 3.0, 1.0, 1.0)

    def truth(c: Candidate) -> float:
        return sum(w * t for w, t in zip(weights, terms(c, TINY, PROFILES["cpu"])))

    s, results = search(), {}
    while (step := s.next(results)).candidate is not None:
        results[step.candidate.key] = result(step.candidate, ms=truth(step.candidate) * 1000, trial=len(results) + 1)
    best = min(SPACE, key=truth)
    assert best.key in results and len(results) <= len(SPACE) // 2


def test_distance() -> None:
    assert distance(cand(), cand()) == 0
    assert distance(cand(), cand(mbs=8)) == 0.5
    assert distance(cand(), cand(dp=1, tp=2)) == 1
    assert distance(cand(), dataclasses.replace(cand(), **FULL)) == 1
