"""Upstream FlagScale's `experiment.auto_tuner` keys, read into this tuner's block.

Upstream's training auto-tuner is configured with the same four sections in places under other
names: `control.max_time_per_task` (seconds a trial may run), `control.train_iters`, `control.max_time`,
`control.interval` (seconds between looks at a trial), `space.use_recompute` (recompute on/off, with
`recompute_granularity` choosing how), `num_layers_per_virtual_pipeline_stage: 0` (no interleaving),
`memory_model.gpu_memory` and `gpu_utilization: [min, max]`, `performance.name`/`order` (a log
pattern and its sort order), `algo` (grid search and its dimension order) and `platform` (the AIRS
platform hook). `translate` renames what this tuner honours to its own keys, with a note for each,
and refuses in one line per key what it does not do: heterogeneous search, the serve tuner's
dimensions, the AIRS platform, another memory model or search algorithm.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from flagscale.exceptions import ConfigError

PATH = "experiment.auto_tuner"
EXHAUSTIVE_STOP_MARGIN = 1e9
"""control.stop_margin that turns the early stop off (every valid candidate is tried)."""

RENAMES: dict[str, dict[str, str]] = {
    "control": {"max_time_per_task": "trial_timeout_s", "train_iters": "iterations", "max_time": "max_time_s",
                "interval": "poll_interval_s"},
    "memory_model": {"gpu_memory": "device_memory_mb", "gpu_utilization": "utilization"},
}
"""Section -> upstream key -> this tuner's key with the same meaning."""

_HETERO = "heterogeneous (hetero) search is not implemented by this tuner; remove the hetero_* keys to tune a " \
          "homogeneous job"
_SERVE = ("a dimension of the serving auto-tuner: it belongs in the auto_tuner block of a serve config "
          "(experiment.task.type: serve), not a training one")
_UPSTREAM_INTERNAL = "filled in by upstream's tuner itself; here the world size comes from experiment.runner and " \
                     "the hostfile; remove it"
UNSUPPORTED: dict[str, str] = {
    "space.hetero_pipeline_layer_split": _HETERO,
    "space.hetero_process_meshes": _HETERO,
    "space.block_size": _SERVE,
    "space.max_num_batched_tokens": _SERVE,
    "space.max_num_seqs": _SERVE,
    "space.swap_space": _SERVE,
    "space.instance": _SERVE,
    "engines": "the engine list of the serving auto-tuner: it belongs in a serve config (experiment.task.type: serve)",
    "args_mapping": "trial values are written under their Megatron names where train.* has them (else under "
                    "train.system); a key mapping is not supported, remove it",
    "nnodes": _UPSTREAM_INTERNAL,
    "nproc_per_node": _UPSTREAM_INTERNAL,
    "cards": _UPSTREAM_INTERNAL,
    "memory": _UPSTREAM_INTERNAL,
}
"""Dotted key (below experiment.auto_tuner) -> why this tuner refuses it."""

SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "": ("algo", "platform", "engines", "args_mapping", "nnodes", "nproc_per_node", "cards", "memory"),
    "space": ("use_recompute", "hetero_pipeline_layer_split", "hetero_process_meshes", "block_size",
              "max_num_batched_tokens", "max_num_seqs", "swap_space", "instance"),
    "control": tuple(RENAMES["control"]),
    "memory_model": (*RENAMES["memory_model"], "model_name"),
    "performance": ("name", "order"),
    "algo": ("name", "priority"),
    "platform": ("airs_switch",),
}
"""Upstream's keys per section ('' = the block itself), for the unknown-key check and its suggestions."""


class _Reader:
    """One pass over an auto_tuner block: the translated block, notes on what was read, refused keys."""

    def __init__(self, block: Mapping[str, Any]) -> None:
        self.data: dict[str, Any] = copy.deepcopy(dict(block))
        self.notes: list[str] = []
        self.refused: list[str] = []

    def section(self, name: str) -> dict[str, Any] | None:
        value = self.data.get(name)
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{PATH}.{name} must be a mapping, got {value!r}")
        if value is not None and not isinstance(value, dict):
            self.data[name] = dict(value)
        return self.data.get(name)

    def take(self, name: str) -> Mapping[str, Any] | None:
        """Remove an upstream-only section (algo, platform) and return it, its keys checked."""
        value = self.data.pop(name, None)
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{PATH}.{name} must be a mapping, got {value!r}")
        unknown = sorted(set(value or {}) - set(SECTION_KEYS[name]))
        if unknown:
            raise ConfigError(f"unknown key '{PATH}.{name}.{unknown[0]}'; known keys: "
                              f"{', '.join(SECTION_KEYS[name])}")
        return value

    def refuse_unsupported(self) -> None:
        for dotted, why in UNSUPPORTED.items():
            *parent, key = dotted.split(".")
            holder = self.section(parent[0]) if parent else self.data
            if holder is not None and key in holder:
                self.refused.append(f"{PATH}.{dotted}: {why}")

    def rename(self, section: str) -> None:
        values = self.section(section)
        for old, new in RENAMES.get(section, {}).items():
            if values is None or old not in values:
                continue
            if new in values:
                raise ConfigError(f"{PATH}.{section}: set only one of {old} (upstream's name) and {new}")
            values[new] = values.pop(old)
            self.notes.append(f"{PATH}.{section}.{old} (upstream) read as {section}.{new}: {values[new]!r}")

    def note(self, text: str) -> None:
        self.notes.append(f"{PATH}.{text}")

    def refuse(self, text: str) -> None:
        self.refused.append(f"{PATH}.{text}")


def translate(block: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Upstream keys -> this tuner's (returns the block and a note per key read); ConfigError naming every
    upstream key this tuner does not implement, one line each."""
    reader = _Reader(block)
    reader.refuse_unsupported()
    _control(reader)
    _space(reader)
    _memory_model(reader)
    _performance(reader)
    _algo(reader)
    _platform(reader)
    if reader.refused:
        raise ConfigError("keys of upstream FlagScale's auto-tuner that this tuner does not implement:\n  - "
                          + "\n  - ".join(reader.refused))
    return reader.data, reader.notes


def _control(reader: _Reader) -> None:
    control = reader.section("control")
    upstream_iterations = control is not None and "train_iters" in control
    reader.rename("control")
    if upstream_iterations and "warmup_iterations" not in control:  # upstream averages every iteration but the first
        control["warmup_iterations"] = 1
        reader.note("control.warmup_iterations: 1 (upstream leaves only the first iteration out of its average)")


def _space(reader: _Reader) -> None:
    space = reader.section("space")
    if space is None:
        return
    vpl = space.get("num_layers_per_virtual_pipeline_stage")
    if isinstance(vpl, list) and 0 in vpl:
        space["num_layers_per_virtual_pipeline_stage"] = list(dict.fromkeys(v or None for v in vpl))
        reader.note("space.num_layers_per_virtual_pipeline_stage: 0 (upstream's 'no interleaving') read as null")
    if "use_recompute" in space:
        space["recompute_granularity"] = _fold_use_recompute(space.pop("use_recompute"),
                                                             space.get("recompute_granularity"))
        reader.note(f"space.use_recompute (upstream) folded into recompute_granularity: "
                    f"{space['recompute_granularity']!r}")


def _fold_use_recompute(use: Any, granularity: Any) -> Any:
    """Upstream's recompute switch as recompute_granularity values: null for off, selective/full for on."""
    flags = [True, False] if use == "auto" else use
    if not isinstance(flags, list) or not flags or not all(isinstance(f, bool) for f in flags):
        raise ConfigError(f"{PATH}.space.use_recompute must be 'auto' or a list of true/false, got {use!r}")
    if granularity in (None, "auto"):
        kinds = ["selective", "full"]
    elif isinstance(granularity, list):
        kinds = [g for g in granularity if g]
    else:
        return granularity  # not a valid setting: the space's own check names it
    values = ([None] if False in flags else []) + (kinds if True in flags else [])
    if not values:
        raise ConfigError(f"{PATH}.space.use_recompute: [true] needs recompute_granularity with selective or full, "
                          f"got {granularity!r}")
    return values


def _memory_model(reader: _Reader) -> None:
    memory = reader.section("memory_model")
    if memory is None:
        return
    reader.rename("memory_model")
    name = memory.pop("model_name", None)
    if name not in (None, "default"):
        reader.refuse(f"memory_model.model_name: '{name}' is not a memory model of this tuner (only 'default', "
                      "its own per-stage estimate)")
    elif name == "default":
        reader.note("memory_model.model_name: default (this tuner's own per-stage memory estimate)")


def _performance(reader: _Reader) -> None:
    """Upstream's log pattern (`name`) and sort order (`order`) as the metric they stand for."""
    performance = reader.section("performance")
    if performance is None:
        return
    if "name" in performance:
        name = performance.pop("name")
        metric = _metric_of_pattern(str(name))
        if metric is None:
            reader.refuse(f"performance.name: upstream's log pattern {name!r} is not read here (metrics come from "
                          "metrics.jsonl); set performance.metric: tokens_per_s or step_time_ms")
        else:
            _set_metric(reader, performance, metric, f"name: {name!r}")
    if "order" in performance:
        order = performance.pop("order")
        implied = {"ascend": "step_time_ms", "descend": "tokens_per_s"}.get(str(order))
        if implied is None:
            raise ConfigError(f"{PATH}.performance.order must be ascend or descend, got {order!r}")
        _set_metric(reader, performance, implied, f"order: {order}")


def _metric_of_pattern(pattern: str) -> str | None:
    """The metrics.jsonl metric an upstream log pattern measures, if one does."""
    text = pattern.lower()
    if "elapsed time per iteration" in text:
        return "step_time_ms"
    if "throughput" in text or "tokens" in text:
        return "tokens_per_s"
    return None


def _set_metric(reader: _Reader, performance: dict[str, Any], metric: str, source: str) -> None:
    """Upstream's `source` (`name: ...` or `order: ...`) as performance.metric, unless metric says otherwise."""
    if performance.get("metric", metric) != metric:
        reader.refuse(f"performance.{source} means metric {metric}, but performance.metric is "
                      f"{performance['metric']}; keep one")
        return
    performance["metric"] = metric
    reader.note(f"performance.{source} (upstream) read as performance.metric: {metric}")


def _algo(reader: _Reader) -> None:
    algo = reader.take("algo")
    if algo is None:
        return
    if algo.get("priority") is not None:
        reader.refuse(f"algo.priority: '{algo['priority']}' orders upstream's grid; trials here are ordered by "
                      "predicted step time; remove it")
    name = algo.get("name", "grid")
    if name != "grid":
        reader.refuse(f"algo.name: '{name}' is not a search of this tuner (only grid: every valid candidate)")
        return
    control = reader.section("control") or reader.data.setdefault("control", {})
    if "stop_margin" not in control:
        control["stop_margin"] = EXHAUSTIVE_STOP_MARGIN
        reader.note("algo.name: grid read as control.stop_margin: 1e9 (every valid candidate is tried, "
                    "most promising first)")


def _platform(reader: _Reader) -> None:
    platform = reader.take("platform")
    if platform is None:
        return
    if platform.get("airs_switch"):
        reader.refuse("platform.airs_switch: the AIRS (Jiuding) platform hook is not implemented; set it false "
                      "or remove platform")
    else:
        reader.note("platform: the AIRS platform hook is off; nothing to do")
