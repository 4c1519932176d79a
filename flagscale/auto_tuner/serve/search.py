"""Which serving candidate to try next, and when to stop.

The objective ranks trials: one that meets every SLO bound (and lost no request) beats one that does not; among
those that meet them the metric decides; among those that do not, the smaller worst violation.

`climb` (the default):
1. Scouts: each engine's candidate nearest to the deployment's configured settings (a failed one: the next
   nearest; two failures and no success: the engine is given up, with its reason).
2. Climb: the engine whose best trial ranks highest goes first; from its best trial (the incumbent), the
   neighbours one step along one dimension (the space's value lists, in order) are tried; a neighbour becomes the
   incumbent only when it is better by `min_gain` (measurements vary by a few %). An engine whose every
   neighbour of its incumbent was tried or pruned has converged — unless a neighbour beat it but missed the SLO:
   then that neighbour's neighbours along the other dimensions are tried (one step aside from where it crossed
   the bound, a better setting may meet it).
3. Every engine first tries the neighbours of its first settings (the configured ones may suit one engine and not
   another); after that it is climbed only while its best metric, improved by as much as climbing gained on the
   best engine or on itself (best over first trial) and by `stop_margin` more, could still reach the best trial
   that meets the SLO (a 4x slower engine is not tuned further); the search ends when every engine has converged
   or been skipped.
History prunes too: a trial that ran out of memory rules out every candidate of its engine that needs at least as
much (larger or equal `memory_knobs`, smaller or equal `split_knobs`, the rest equal: flagscale/serve/engines/).

`grid`: every candidate, in order (the baseline the benchmark compares with).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from flagscale.auto_tuner.history import TrialStatus
from flagscale.auto_tuner.serve.config import METRICS, REPLICAS
from flagscale.auto_tuner.serve.history import ServeResult
from flagscale.auto_tuner.serve.space import ServeCandidate, distance
from flagscale.serve.engines import engine_for


@dataclass(frozen=True, slots=True, kw_only=True)
class Objective:
    """performance.metric under performance.slo."""

    metric: str
    """A figure of METRICS (flagscale/auto_tuner/serve/config.py: which ones are better higher)."""
    slo: Mapping[str, float] = field(default_factory=dict)
    """Figure -> bound: a latency's is a maximum, a throughput's a minimum."""

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]

    def violations(self, r: ServeResult) -> dict[str, float]:
        """SLO figure -> how far beyond its bound the trial is (a fraction of the bound; a missing figure: inf)."""
        out: dict[str, float] = {}
        for name, bound in self.slo.items():
            value = r.metric(name)
            if value is None:
                out[name] = math.inf
            elif METRICS[name] and value < bound:
                out[name] = bound / value - 1 if value > 0 else math.inf
            elif not METRICS[name] and value > bound:
                out[name] = value / bound - 1
        return out

    def feasible(self, r: ServeResult) -> bool:
        return r.status is TrialStatus.OK and not r.failed_requests and r.metric(self.metric) is not None and (
            not self.violations(r))

    def violation(self, r: ServeResult) -> float:
        """The worst SLO violation (0: met; inf: the trial failed)."""
        if r.status is not TrialStatus.OK or r.metric(self.metric) is None:
            return math.inf
        return max(self.violations(r).values(), default=0.0)

    def signed(self, value: float) -> float:
        """The metric as a number to maximise."""
        return value if self.higher_is_better else -value

    def rank(self, r: ServeResult) -> tuple[int, float]:
        """Larger is better: meeting the SLO first, then the metric (or the smaller violation)."""
        if self.feasible(r):
            return (1, self.signed(r.metric(self.metric) or 0.0))
        return (0, -self.violation(r))

    def beats(self, a: ServeResult, b: ServeResult, gain: float) -> bool:
        """a is better than b by more than `gain` (a fraction of b's metric) when both meet the SLO."""
        ra, rb = self.rank(a), self.rank(b)
        if ra[0] != rb[0]:
            return ra[0] > rb[0]
        if ra[0] == 0:
            return ra[1] > rb[1]
        va, vb = a.metric(self.metric) or 0.0, b.metric(self.metric) or 0.0
        return va > vb * (1 + gain) if self.higher_is_better else va * (1 + gain) < vb

    def credited(self, value: float, gain: float) -> float:
        """`value` improved by a factor `gain` (multiplied for a throughput, divided for a latency)."""
        return value * gain if self.higher_is_better else value / gain

    def could_win(self, value: float, best: float, margin: float) -> bool:
        """Would `value`, `margin` better, reach `best`?"""
        return value * (1 + margin) >= best if self.higher_is_better else value <= best * (1 + margin)

    def best(self, results: list[ServeResult]) -> ServeResult | None:
        """The best trial that meets the SLO (ties: the earlier one)."""
        feasible = [r for r in results if self.feasible(r)]
        return max(feasible, key=lambda r: (self.rank(r), -r.trial)) if feasible else None

    def closest(self, results: list[ServeResult]) -> ServeResult | None:
        """The ok trial nearest to meeting the SLO."""
        ok = [r for r in results if r.status is TrialStatus.OK and r.metric(self.metric) is not None]
        return min(ok, key=lambda r: (self.violation(r), r.trial)) if ok else None


@dataclass(frozen=True, slots=True)
class Step:
    candidate: ServeCandidate | None
    stop_reason: str = ""


class ServeSearch:
    """Picks trials among the candidates that passed the static pruning."""

    def __init__(self, candidates: list[ServeCandidate], order: Mapping[str, Mapping[str, list[Any]]],
                 targets: Mapping[str, Mapping[str, Any]], objective: Objective, *, search: str = "climb",
                 stop_margin: float = 0.25, min_gain: float = 0.03) -> None:
        self.candidates = list(candidates)
        self.order = order
        """Engine -> dimension -> its values, in order (neighbours are one step apart)."""
        self.targets = targets
        """Engine -> its configured settings (where the scouts start)."""
        self.objective = objective
        self.search = search
        self.stop_margin = stop_margin
        self.min_gain = min_gain
        self.fates: dict[str, str] = {}
        """Why a candidate was not tried (filled as the search goes)."""

    def next(self, results: Mapping[str, ServeResult]) -> Step:
        done = sorted(results.values(), key=lambda r: r.trial)
        left = [c for c in self.candidates if c.key not in results and not self._oom_pruned(c, done)]
        if not left:
            return Step(None, "every candidate was tried or pruned")
        if self.search == "grid":
            return Step(left[0])
        engines = list(dict.fromkeys(c.engine for c in self.candidates))
        for engine in engines:  # 1. scouts
            step = self._scout(engine, [r for r in done if r.candidate.engine == engine],
                               [c for c in left if c.engine == engine])
            if step is not None:
                return step
        incumbents = {e: self.incumbent([r for r in done if r.candidate.engine == e]) for e in engines}
        climbing = sorted((e for e in engines if incumbents[e] is not None),
                          key=lambda e: self.objective.rank(incumbents[e]), reverse=True)  # type: ignore[arg-type]
        best = self.objective.best(done)
        for engine in climbing:  # 2. climb, best engine first
            incumbent = incumbents[engine]
            assert incumbent is not None
            mine = [r for r in done if r.candidate.engine == engine]
            waiting = [c for c in left if c.engine == engine]
            value = incumbent.metric(self.objective.metric)
            credit = max(self.tuning_gain(best, done), self.tuning_gain(incumbent, mine))
            if best is not None and best.candidate.engine != engine and value is not None and not (
                    self.objective.could_win(self.objective.credited(value, credit),
                                             best.metric(self.objective.metric) or 0.0, self.stop_margin)):
                first = next(r for r in mine if r.status is TrialStatus.OK)
                first_round = [n for n in self.neighbours(first.candidate) if n in waiting]
                if first_round:  # the neighbours of an engine's first settings are tried before it is skipped
                    return Step(first_round[0])
                self._fate(waiting, f"skipped: {engine}'s best (trial {incumbent.trial}, {value:,.1f} "
                           f"{self.objective.metric}) cannot reach trial {best.trial}'s even with the {credit:.2f}x "
                           f"tuning gained on {best.candidate.engine} and {self.stop_margin:.0%} more")
                continue
            for neighbour in self.neighbours(incumbent.candidate):
                if neighbour in waiting:
                    return Step(neighbour)
            for beyond in self.past_the_bound(incumbent, mine):
                if beyond in waiting:
                    return Step(beyond)
            self._fate(waiting, f"not tried: no neighbour of {engine}'s best (trial {incumbent.trial}) is left; "
                       "its climb converged")
        return Step(None, "converged: every engine's best setting has no untried neighbour (or the engine cannot "
                    "beat the best)")

    def past_the_bound(self, incumbent: ServeResult, mine: list[ServeResult]) -> Iterator[ServeCandidate]:
        """Neighbours of the incumbent's neighbours that missed the SLO while beating its metric: a better setting
        that meets the bound may lie one step aside from them (a diagonal move the climb alone never makes)."""
        adjacent = set(self.neighbours(incumbent.candidate))
        value = incumbent.metric(self.objective.metric)
        if value is None:
            return
        floor = self.objective.signed(value) + abs(value) * self.min_gain

        def gain(r: ServeResult) -> float:
            return self.objective.signed(r.metric(self.objective.metric) or 0.0)

        over = [r for r in mine if r.candidate in adjacent and r.metric(self.objective.metric) is not None
                and not self.objective.feasible(r) and math.isfinite(self.objective.violation(r)) and gain(r) > floor]
        mine_values = incumbent.candidate.values
        for r in sorted(over, key=gain, reverse=True):  # aside from r, not further along the step that crossed
            yield from (n for n in self.neighbours(r.candidate) if n not in adjacent
                        and sum(v != mine_values[k] for k, v in n.settings) == 2)

    def tuning_gain(self, best: ServeResult | None, done: list[ServeResult]) -> float:
        """How much the climb improved the best engine over its first ok trial (>= 1): the credit an engine still
        at its first settings gets before it is compared with the best."""
        if best is None:
            return 1.0
        first = next((r for r in done if r.candidate.engine == best.candidate.engine and r.status is TrialStatus.OK),
                     None)
        start, end = (first.metric(self.objective.metric) if first else None), best.metric(self.objective.metric)
        if not start or not end:
            return 1.0
        return max(1.0, end / start if self.objective.higher_is_better else start / end)

    def _scout(self, engine: str, tried: list[ServeResult], waiting: list[ServeCandidate]) -> Step | None:
        """The engine's first candidate (nearest to its configured settings) until one trial of it is ok."""
        if any(r.status is TrialStatus.OK for r in tried) or not waiting:
            return None
        if len(tried) >= 2:
            self._fate(waiting, f"skipped: {engine} failed {len(tried)} times ({tried[-1].reason[:120]})")
            return None
        order, target = self.order.get(engine, {}), self.targets.get(engine, {})
        return Step(min(waiting, key=lambda c: (distance(c, target, order), self.candidates.index(c))))

    def incumbent(self, results: list[ServeResult]) -> ServeResult | None:
        """An engine's best trial so far: replaced only by one better by min_gain (trial order)."""
        best: ServeResult | None = None
        for r in results:
            if r.status is not TrialStatus.OK:
                continue
            if best is None or self.objective.beats(r, best, self.min_gain):
                best = r
        return best

    def neighbours(self, c: ServeCandidate) -> Iterator[ServeCandidate]:
        """One step up, then down, along each dimension in order."""
        order = self.order.get(c.engine, {})
        for name, value in c.settings:
            values = order[name]
            at = values.index(value)
            for other in (at + 1, at - 1):
                if 0 <= other < len(values):
                    yield c.with_value(name, values[other])

    def _oom_pruned(self, c: ServeCandidate, done: list[ServeResult]) -> bool:
        for r in done:
            if r.status is TrialStatus.OOM and r.candidate.engine == c.engine and needs_more_memory(c, r.candidate):
                self.fates[c.key] = f"pruned: needs at least the memory of trial {r.trial}, which ran out"
                return True
        return False

    def _fate(self, candidates: list[ServeCandidate], fate: str) -> None:
        for c in candidates:
            self.fates[c.key] = fate


def needs_more_memory(b: ServeCandidate, a: ServeCandidate) -> bool:
    """b is not a and needs at least a's memory: its memory knobs at least a's, its split knobs at most a's, every
    other setting the same (a knob with a non-numeric value only compares equal)."""
    if b == a or b.engine != a.engine:
        return False
    engine = engine_for(b.engine)
    theirs = a.values
    for name, value in b.settings:
        other = theirs.get(name)
        numeric = isinstance(value, int | float) and isinstance(other, int | float) and not isinstance(value, bool)
        if (name in engine.memory_knobs or name == REPLICAS) and numeric:
            if value < other:
                return False
        elif name in engine.split_knobs and numeric:
            if value > other:
                return False
        elif value != other:
            return False
    return True
