"""The serving search space: a ServeCandidate is one engine with values for its searched arguments (and maybe
`num_replicas`, the deployment's resources.num_replicas); `generate`
expands each engine's space into every combination; `trial_item` writes a candidate into the user's serve
deployment; `fit_problems` is the static pruning (what the engine itself says cannot serve the load on the devices
there are: flagscale/serve/engines/, `fit_problems`)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flagscale.auto_tuner.serve.config import REPLICAS, ServeTunerConfig
from flagscale.exceptions import ConfigError
from flagscale.serve.deployment import Deployment, parse_deployments
from flagscale.serve.engines import engine_for
from flagscale.serve.loadgen import LoadProfile

MAX_CANDIDATES = 10_000


@dataclass(frozen=True, slots=True)
class ServeCandidate:
    """An engine and the values of its searched arguments (in the space's order)."""

    engine: str
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.settings)

    @property
    def key(self) -> str:
        """A stable id (history.csv rows are matched by it)."""
        return f"{self.engine}:" + ",".join(f"{k}={_text(v)}" for k, v in self.settings)

    def describe(self) -> str:
        """Short text for tables."""
        return " ".join([self.engine, *(f"{k}={_text(v)}" for k, v in self.settings)]) if self.settings else (
            f"{self.engine} (as configured)")

    def with_value(self, name: str, value: Any) -> ServeCandidate:
        return ServeCandidate(self.engine, tuple((k, value if k == name else v) for k, v in self.settings))


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def generate(config: ServeTunerConfig) -> list[ServeCandidate]:
    """Every combination of each engine's space (an engine without one: a single candidate, as configured)."""
    candidates: list[ServeCandidate] = []
    for engine in config.engines:
        dims = config.space.get(engine, {})
        for combo in itertools.product(*dims.values()):
            candidates.append(ServeCandidate(engine, tuple(zip(dims, combo))))
            if len(candidates) > MAX_CANDIDATES:
                raise ConfigError(f"experiment.auto_tuner.space has more than {MAX_CANDIDATES:,} combinations; "
                                  "give fewer values")
    return candidates


def trial_item(item: Mapping[str, Any], candidate: ServeCandidate) -> dict[str, Any]:
    """The user's deployment (a serve list entry) served by the candidate's engine with its values: they go into
    engine_args_specific[engine], which wins over engine_args (flagscale/serve/deployment.py)."""
    item = copy.deepcopy(dict(item))
    item["engine"] = candidate.engine
    values = candidate.values
    if REPLICAS in values:
        item["resources"] = {**dict(item.get("resources") or {}), REPLICAS: values.pop(REPLICAS)}
    specific = dict(item.get("engine_args_specific") or {})
    specific[candidate.engine] = {**dict(specific.get(candidate.engine) or {}), **values}
    item["engine_args_specific"] = specific
    return item


def deployment_of(item: Mapping[str, Any], candidate: ServeCandidate) -> Deployment:
    """The candidate's deployment as the serve runner will see it."""
    return parse_deployments([trial_item(item, candidate)], "serve", default_engine=candidate.engine)[0]


def fit_problems(item: Mapping[str, Any], candidate: ServeCandidate, profile: LoadProfile, devices: int) -> list[str]:
    """Why the candidate cannot serve the profile's requests on `devices` devices (empty: it can)."""
    deployment = deployment_of(item, candidate)
    replicas, engine = deployment.resources.num_replicas, engine_for(candidate.engine)
    problems = engine.fit_problems(deployment, profile.longest, devices)
    need = engine.devices(deployment) * replicas
    if replicas > 1 and need > devices and not any(p.startswith("needs ") for p in problems):
        problems.insert(0, f"needs {need} devices ({replicas} servers of {engine.devices(deployment)}), "
                        f"{devices} available (experiment.auto_tuner.cards)")
    return problems


def distance(candidate: ServeCandidate, target: Mapping[str, Any], order: Mapping[str, list[Any]]) -> float:
    """How far a candidate's values lie from `target` (steps along each dimension's list; unknown values: the
    middle of the list)."""
    total = 0.0
    for name, value in candidate.settings:
        values = order[name]
        want = target.get(name)
        centre = values.index(want) if want in values else (len(values) - 1) / 2
        total += abs(values.index(value) - centre)
    return total
