"""Which candidate to try next, which to prune by history, and when to stop.

- Order: the candidate with the shortest predicted step time (cost.Predictor: a cost model
  refitted after every trial, corrected by the most similar measured trials).
- History: a failed, OOM or timed-out candidate is never retried; an OOM also prunes every
  candidate that needs at least as much memory in every dimension (`needs_more_memory`).
- Early stop: with a best measured step time `best`, a candidate stays plausible only while
  `predicted / (1 + stop_margin) <= best`, i.e. it could still win if the prediction were
  `stop_margin` too pessimistic; the most promising candidate of a layout (tp, pp, cp, ep) with no
  trial yet stays plausible regardless. The search ends when no plausible candidate is left.
"""

from __future__ import annotations

from dataclasses import dataclass

from flagscale.auto_tuner.cost import Predictor
from flagscale.auto_tuner.history import TrialResult, TrialStatus
from flagscale.auto_tuner.space import Candidate

_RECOMPUTE_RANK = {None: 2, "selective": 1, "full": 0}
"""Memory rank of a recompute setting: higher keeps more activations."""


def _recompute_needs_more(b: Candidate, a: Candidate) -> bool:
    if _RECOMPUTE_RANK[b.recompute] != _RECOMPUTE_RANK[a.recompute]:
        return _RECOMPUTE_RANK[b.recompute] > _RECOMPUTE_RANK[a.recompute]
    if b.recompute != "full":
        return True
    if b.recompute_method != a.recompute_method:
        return False
    # block: fewer recomputed layers keep more; uniform: only the same chunking is comparable
    return (b.recompute_layers or 0) <= (a.recompute_layers or 0) if b.recompute_method == "block" else (
        b.recompute_layers == a.recompute_layers)


def needs_more_memory(b: Candidate, a: Candidate) -> bool:
    """True if b is not a and needs at least a's memory per process in every dimension: larger or equal
    micro batch, smaller or equal tp/pp/cp split, less recompute, no distributed optimizer or sequence
    parallelism where a has none either, the same interleaving and expert split."""
    return (
        b != a and b.mbs >= a.mbs and b.tp <= a.tp and b.pp <= a.pp and b.cp <= a.cp
        and b.ep == a.ep and b.vpp_layers == a.vpp_layers
        and b.dist_opt <= a.dist_opt and b.sp <= a.sp and _recompute_needs_more(b, a)
    )


def layout(c: Candidate) -> tuple[int, ...]:
    """How the model is split (tp, pp, cp, ep); dp follows from the world size."""
    return (c.tp, c.pp, c.cp, c.ep)


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """The search's answer: the next candidate, or why it stops."""

    candidate: Candidate | None
    stop_reason: str = ""


class Search:
    """Picks trials among the valid, memory-feasible candidates."""

    def __init__(self, candidates: list[Candidate], predictor: Predictor, stop_margin: float) -> None:
        self.candidates = sorted(candidates, key=lambda c: c.key)
        self.predictor = predictor
        self.stop_margin = stop_margin
        self.fates: dict[str, str] = {}
        """Why each candidate did not run (filled as the search goes)."""

    def observe(self, results: dict[str, TrialResult]) -> None:
        """Refit the predictor to the trials that measured a step time."""
        measured = {r.candidate: r.step_time_ms / 1000 for r in results.values()
                    if r.status is TrialStatus.OK and r.step_time_ms}
        self.predictor.fit(measured)

    def oom_pruner(self, c: Candidate, results: dict[str, TrialResult]) -> TrialResult | None:
        """The OOM trial that rules c out, if any."""
        return next((r for r in results.values()
                     if r.status is TrialStatus.OOM and needs_more_memory(c, r.candidate)), None)

    def remaining(self, results: dict[str, TrialResult]) -> list[Candidate]:
        """Candidates neither tried nor pruned by an OOM (pruned ones get their fate recorded)."""
        left = []
        for c in self.candidates:
            if c.key in results:
                continue
            pruner = self.oom_pruner(c, results)
            if pruner is not None:
                self.fates[c.key] = f"pruned: needs at least the memory of trial {pruner.trial}, which ran out"
            else:
                left.append(c)
        return left

    def next(self, results: dict[str, TrialResult]) -> Step:
        """The most promising plausible candidate, or None with the reason the search ends."""
        self.observe(results)
        left = self.remaining(results)
        if not left:
            return Step(candidate=None, stop_reason="every candidate was tried or pruned")
        times = {c: self.predictor.predict(c) for c in left}
        ok = [r.step_time_ms / 1000 for r in results.values() if r.status is TrialStatus.OK and r.step_time_ms]
        best = min(ok, default=None)
        scouts = self.layout_scouts(left, times, results)
        plausible = [c for c in left if best is None or times[c] / (1 + self.stop_margin) <= best or c in scouts]
        for c in left:
            if c not in plausible:
                self.fates[c.key] = (f"skipped: predicted {times[c] * 1000:.1f} ms/step cannot beat the best "
                                     f"{best * 1000:.1f} ms even {self.stop_margin:.0%} faster")
        if not plausible:
            return Step(candidate=None, stop_reason=f"early stop: none of the {len(left)} remaining candidates can "
                        f"beat the best measured step time (stop_margin {self.stop_margin:.0%})")
        for c in plausible:
            self.fates.pop(c.key, None)
        choice = min(plausible, key=lambda c: (times[c], c.key))
        return Step(candidate=choice)

    @staticmethod
    def layout_scouts(left: list[Candidate], times: dict[Candidate, float],
                      results: dict[str, TrialResult]) -> set[Candidate]:
        """The most promising candidate of each layout (tp, pp, cp, ep) with no trial yet other than OOMs:
        the cost model is least reliable across layouts (their communication costs depend on the hardware
        most), so every layout gets measured once before the early stop may skip it."""
        explored = {layout(r.candidate) for r in results.values() if r.status is not TrialStatus.OOM}
        scouts: dict[tuple[int, ...], Candidate] = {}
        for c in sorted(left, key=lambda c: (times[c], c.key)):
            if layout(c) not in explored:
                scouts.setdefault(layout(c), c)
        return set(scouts.values())

    def drop(self, c: Candidate, fate: str) -> None:
        """Take a candidate out of the search (found invalid only when its trial config was built)."""
        self.candidates.remove(c)
        self.fates[c.key] = fate

    def predicted_ms(self, c: Candidate) -> float:
        """The current prediction of a candidate's step time (ms)."""
        return self.predictor.predict(c) * 1000
