"""The `experiment.auto_tuner` block of a serve config: which engines (`engines`), what to search per engine
(`space`), what to maximise under which latency bounds (`performance.metric`, `performance.slo`) and how long to
try (`control`). The load each trial is measured with is the deployment's `profile:` (flagscale/serve/loadgen.py).

    auto_tuner:
      engines: [vllm, llama_cpp]
      space:
        vllm: {max_num_seqs: [2, 8], enable_chunked_prefill: [true, false]}
        llama_cpp: {parallel: [1, 2, 4], threads: [1, 2]}
      performance: {metric: output_tokens_per_s, slo: {ttft_p95_ms: 500}}
      control: {max_trials: 12}

Upstream FlagScale's serve tuner keys load too (examples/qwen3/conf/serve_atmb.yaml, examples/qwen2_5/conf/
serve_auto_tuner.yaml upstream): a flat `space` is the deployment's engine's, `tensor_model_parallel_size` /
`pipeline_model_parallel_size` are vLLM's tensor/pipeline_parallel_size, `instance` is resources.num_replicas
(servers the load generator spreads its requests over), `cards` the devices to use, `control.interval`,
`performance.order`, upstream's metric names (ttft, itl, tpot, e2e_latency, token_throughput, ...) and
`algo.name: grid`; each is noted as it is read. An engine in `engines` that is not installed ends in one line
before any trial.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from flagscale.config.schema import build, unknown_key_message
from flagscale.exceptions import ConfigError

PATH = "experiment.auto_tuner"
LATENCIES = tuple(f"{name}_{stat}_ms" for name in ("ttft", "itl", "tpot", "e2el") for stat in ("mean", "p50", "p95"))
THROUGHPUTS = ("output_tokens_per_s", "total_tokens_per_s", "requests_per_s")
METRICS: dict[str, bool] = {**{m: True for m in THROUGHPUTS}, **{m: False for m in LATENCIES}}
"""A figure of flagscale/serve/loadgen.py -> whether higher is better. An SLO bounds a latency from above and a
throughput from below."""
UPSTREAM_METRICS = {"ttft": "ttft_mean_ms", "itl": "itl_mean_ms", "tpot": "tpot_mean_ms", "topt": "tpot_mean_ms",
                    "e2el": "e2el_mean_ms", "e2e_latency": "e2el_mean_ms", "request_throughput": "requests_per_s",
                    "token_throughput": "total_tokens_per_s"}
"""Upstream's serve metrics (means over the requests) -> the same figure here."""
SPACE_ALIASES = {"tensor_model_parallel_size": "tensor_parallel_size",
                 "pipeline_model_parallel_size": "pipeline_parallel_size", "instance": "num_replicas"}
"""Upstream's names in a serve space: vLLM's parallel sizes, and `instance` (servers of the deployment)."""
REPLICAS = "num_replicas"
"""The dimension that is not an engine argument: resources.num_replicas, servers the load is spread over."""
AUTO_DIMENSIONS = ("tensor_parallel_size", "pipeline_parallel_size", REPLICAS)
"""The dimensions `auto` may stand for: every divisor of the devices (`cards`)."""
REFUSED_SPACE: dict[str, str] = {}
SEARCHES = ("climb", "grid")


@dataclass(slots=True, kw_only=True)
class ServeControl:
    """How many trials, how long each, when the search stops and what happens at the end."""

    search: str = "climb"
    """climb: each engine's configured settings first, then one setting at a time from the best so far (see
    flagscale/auto_tuner/serve/search.py); grid: every candidate, in order."""
    max_trials: int | None = None
    """At most this many trials (this run and earlier, resumed ones together)."""
    max_time_s: float | None = None
    """No new trial starts after this many seconds."""
    trial_timeout_s: float = 900.0
    """Caps a trial's server start-up (the deployment's ready_timeout_s) and each request's wait."""
    stop_margin: float = 0.25
    """An engine is climbed further only while its best measured metric, `stop_margin` better, could still beat the
    best of all engines."""
    min_gain: float = 0.03
    """A setting replaces the best so far only when it is better by this fraction (measurements vary by a few %)."""
    run_best: bool = False
    """Serve the best configuration (action=run) when the search ends."""

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise ConfigError(f"{PATH}.control.search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        if self.max_trials is not None and self.max_trials < 1:
            raise ConfigError(f"{PATH}.control.max_trials must be >= 1 (or remove it)")
        for name in ("max_time_s", "trial_timeout_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{PATH}.control.{name} must be > 0, got {value}")
        if self.stop_margin < 0 or self.min_gain < 0:
            raise ConfigError(f"{PATH}.control.stop_margin and min_gain must be >= 0")


@dataclass(slots=True, kw_only=True)
class ServePerformance:
    """The objective: one figure of the load generator, best under the SLO bounds."""

    metric: str = "output_tokens_per_s"
    """What the best configuration maximises (a throughput) or minimises (a latency): one of METRICS."""
    slo: dict[str, float] = field(default_factory=dict)
    """Bounds a configuration must meet: a latency (e.g. ttft_p95_ms: 500) at most, a throughput at least."""

    def __post_init__(self) -> None:
        for name in (self.metric, *self.slo):
            if name not in METRICS:
                raise ConfigError(unknown_key_message(f"{PATH}.performance metric '{name}'", name, list(METRICS)))
        for name, bound in self.slo.items():
            if isinstance(bound, bool) or not isinstance(bound, int | float) or bound <= 0:
                raise ConfigError(f"{PATH}.performance.slo.{name} must be a positive number, got {bound!r}")

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]


@dataclass(slots=True, kw_only=True)
class ServeTunerConfig:
    """experiment.auto_tuner of a serve config."""

    engines: list[str]
    """The engines to try (default: the deployment's own)."""
    space: dict[str, dict[str, list[Any]]]
    """Engine -> engine argument -> the values to try (an engine with no entry: its configured settings only)."""
    devices: int
    """Devices a server may use (`cards`, else the hosts' process slots)."""
    control: ServeControl = field(default_factory=ServeControl)
    performance: ServePerformance = field(default_factory=ServePerformance)
    notes: list[str] = field(default_factory=list)
    """How upstream's keys were read (printed by the tuner)."""


BLOCK_KEYS = ("engines", "space", "control", "performance", "cards", "algo")


def load_serve_tuner_config(block: Mapping[str, Any] | None, engine: str, devices: int) -> ServeTunerConfig:
    """Validate the block for a deployment served by `engine` on hosts with `devices` devices."""
    if block is not None and not isinstance(block, Mapping):
        raise ConfigError(f"{PATH} must be a mapping, got {block!r}")
    block = dict(block or {})
    for key in block:
        if key not in BLOCK_KEYS:
            raise ConfigError(unknown_key_message(f"{PATH}.{key}", key, list(BLOCK_KEYS)))
    notes: list[str] = []
    engines = _engines(block.get("engines"), engine)
    cards = block.get("cards")
    if cards is not None:
        if isinstance(cards, bool) or not isinstance(cards, int) or cards < 1:
            raise ConfigError(f"{PATH}.cards must be a whole number >= 1 (devices a server may use), got {cards!r}")
        devices = cards
    space = _space(block.get("space"), engines, engine, devices, notes)
    control = _section(block, "control", ServeControl, notes)
    algo = block.get("algo")
    if algo is not None:
        if not isinstance(algo, Mapping) or set(algo) - {"name", "priority"}:
            raise ConfigError(f"{PATH}.algo must be a mapping with name (grid)")
        if algo.get("name", "grid") != "grid" or algo.get("priority") is not None:
            raise ConfigError(f"{PATH}.algo: only name: grid is implemented (priority orders upstream's grid; "
                              "remove it), or set control.search: climb")
        control["search"] = "grid"
        notes.append(f"{PATH}.algo.name: grid read as control.search: grid (every candidate)")
    performance = _section(block, "performance", ServePerformance, notes)
    return ServeTunerConfig(engines=engines, space=space, devices=devices, notes=notes,
                            control=build(ServeControl, control, f"{PATH}.control"),
                            performance=build(ServePerformance, performance, f"{PATH}.performance"))


def _engines(value: Any, engine: str) -> list[str]:
    if value is None:
        return [engine]
    if not isinstance(value, list) or not value or not all(isinstance(e, str) for e in value):
        raise ConfigError(f"{PATH}.engines must be a list of engine names, e.g. [vllm, llama_cpp], got {value!r}")
    return list(dict.fromkeys(value))


def _section(block: Mapping[str, Any], name: str, cls: type, notes: list[str]) -> dict[str, Any]:
    """A section with upstream's keys read as ours (control.interval, performance.metric/order)."""
    data = block.get(name) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{PATH}.{name} must be a mapping, got {data!r}")
    data = dict(data)
    if name == "control" and "interval" in data:
        notes.append(f"{PATH}.control.interval ({data.pop('interval')}, upstream's seconds between looks at a "
                     "trial) not needed: a trial is watched until its load ends")
    if name == "performance":
        metric = data.get("metric")
        if isinstance(metric, str) and metric in UPSTREAM_METRICS:
            data["metric"] = UPSTREAM_METRICS[metric]
            notes.append(f"{PATH}.performance.metric: {metric} (upstream) read as {data['metric']}")
        order = data.pop("order", None)
        if order is not None:
            if order not in ("ascend", "descend"):
                raise ConfigError(f"{PATH}.performance.order must be ascend or descend, got {order!r}")
            wanted = data.get("metric", "output_tokens_per_s")
            higher = METRICS.get(str(wanted))
            if higher is not None and higher != (order == "descend"):
                raise ConfigError(f"{PATH}.performance.order: {order} contradicts metric {wanted} (a "
                                  f"{'throughput: higher' if higher else 'latency: lower'} is better); remove order")
            notes.append(f"{PATH}.performance.order: {order} (upstream) agrees with metric {wanted}")
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            raise ConfigError(unknown_key_message(f"{PATH}.{name}.{key}", key, known))
    return data


def _space(value: Any, engines: list[str], engine: str, devices: int, notes: list[str]) -> dict[str, dict[str, list]]:
    """Per-engine dimensions; a flat mapping (upstream's single-engine form) is the deployment's engine's."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{PATH}.space must map engines to their arguments, e.g. {{vllm: {{max_num_seqs: [2, 8]}}}}")
    per_engine = {k: v for k, v in value.items() if k in engines or isinstance(v, Mapping)}
    flat = {k: v for k, v in value.items() if k not in per_engine}
    if flat and per_engine:
        raise ConfigError(f"{PATH}.space mixes engine sections ({', '.join(per_engine)}) with arguments "
                          f"({', '.join(flat)}); put the arguments under their engine")
    if flat:
        per_engine = {engine: flat}
    spaces: dict[str, dict[str, list]] = {}
    for name, dims in per_engine.items():
        if name not in engines:
            raise ConfigError(f"{PATH}.space.{name}: {name} is not in {PATH}.engines ({', '.join(engines)}); add it "
                              "there or remove its space")
        if not isinstance(dims, Mapping):
            raise ConfigError(f"{PATH}.space.{name} must map arguments to lists of values, got {dims!r}")
        spaces[name] = {}
        for key, values in dims.items():
            spaces[name].update(_dimension(f"{PATH}.space.{name}", key, values, devices, notes))
    return spaces


def _dimension(path: str, key: str, values: Any, devices: int, notes: list[str]) -> dict[str, list]:
    if key in REFUSED_SPACE:
        raise ConfigError(f"{path}.{key}: {REFUSED_SPACE[key]}")
    name = SPACE_ALIASES.get(key, key)
    if name != key:
        notes.append(f"{path}.{key} (upstream) read as {name}")
    if values == "auto":
        if name not in AUTO_DIMENSIONS:
            raise ConfigError(f"{path}.{key}: 'auto' stands for the divisors of the devices, which only the parallel "
                              "sizes have; give a list of values")
        values = [d for d in range(1, devices + 1) if devices % d == 0]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{path}.{key} must be a non-empty list of values (e.g. [1, 2]), got {values!r}")
    if not all(v is None or isinstance(v, str | int | float | bool) for v in values):
        raise ConfigError(f"{path}.{key}: values must be numbers, strings, true/false or null, got {values!r}")
    return {name: list(dict.fromkeys(values))}
