"""The `experiment.auto_tuner` block: what to search (`space`), how long to try (`control`),
what to maximise (`performance`) and an optional per-process memory budget (`memory_model`).

Built with `flagscale.config.schema.build`, so an unknown key is an error that suggests the
closest known one, exactly like the rest of the experiment schema. Upstream FlagScale's keys for
the same things (`control.max_time_per_task`, `space.use_recompute`, `memory_model.gpu_memory`, ...)
load too: `upstream.translate` renames them, and `AutoTunerConfig.notes` says what was read how.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from flagscale.auto_tuner import upstream
from flagscale.config.schema import build, unknown_key_message
from flagscale.exceptions import ConfigError

AUTO = "auto"
METRICS = {"tokens_per_s": True, "step_time_ms": False}
"""Metric name -> whether higher is better (both come from the training program's metrics.jsonl)."""
COST_MODELS = ("auto", "cpu", "gpu")


@dataclass(slots=True, kw_only=True)
class SpaceConfig:
    """Each dimension: `auto` (the full valid range), a list of values, or unset (the config's own value).
    Names are the Megatron argument names the values are written to."""

    data_parallel_size: list[Any] | str | None = AUTO
    """Data parallel sizes (derived: world size / (tp × pp × cp)); `auto` = every divisor of the world size."""
    tensor_model_parallel_size: list[Any] | str | None = AUTO
    """Tensor parallel sizes; `auto` = divisors of the world size that divide the attention heads."""
    pipeline_model_parallel_size: list[Any] | str | None = AUTO
    """Pipeline parallel sizes; `auto` = divisors of the world size."""
    context_parallel_size: list[Any] | str | None = None
    """Context parallel sizes (needs TransformerEngine attention)."""
    expert_model_parallel_size: list[Any] | str | None = AUTO
    """Expert parallel sizes; `auto` = divisors of num_experts that divide the world size (1 for a dense
    model); a list only for models with experts (num_experts)."""
    sequence_parallel: list[Any] | str | None = None
    """Sequence parallelism on/off (with tp 1 Megatron switches it off, so it is tried as off)."""
    num_layers_per_virtual_pipeline_stage: list[Any] | str | None = None
    """Layers per virtual pipeline stage (interleaved 1F1B; only with pp > 1); null = no interleaving."""
    micro_batch_size: list[Any] | str | None = AUTO
    """Micro batch sizes; `auto` = every divisor of the global batch size."""
    recompute_granularity: list[Any] | str | None = None
    """Activation recompute: null (off), selective, full."""
    recompute_method: list[Any] | str | None = None
    """For full recompute: uniform or block."""
    recompute_num_layers: list[Any] | str | None = None
    """For full recompute: layers per recompute chunk (uniform) or recomputed layers per stage (block)."""
    use_distributed_optimizer: list[Any] | str | None = None
    """Shard optimizer states over data parallel ranks: true/false."""

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, str) and value != AUTO:
                raise ConfigError(f"experiment.auto_tuner.space.{item.name} must be 'auto' or a list "
                                  f"(e.g. [1, 2]), got '{value}'")
            if isinstance(value, list) and not value:
                raise ConfigError(f"experiment.auto_tuner.space.{item.name} is an empty list; "
                                  "give at least one value, 'auto', or remove it to keep the config's value")

    def dimensions(self) -> dict[str, list[Any] | str | None]:
        """Dimension name -> its setting."""
        return {item.name: getattr(self, item.name) for item in fields(self)}


@dataclass(slots=True, kw_only=True)
class ControlConfig:
    """How many trials, how long each, and what happens at the end."""

    iterations: int = 30
    """Training iterations per trial (the first `warmup_iterations` are not measured)."""
    warmup_iterations: int = 5
    """Iterations at the start of a trial left out of the metric (first-step set-up, caches)."""
    trial_timeout_s: float = 600.0
    """A trial still running after this many seconds is stopped and recorded as timeout."""
    max_time_s: float | None = None
    """No new trial starts after this many seconds in total (the running one is cut to fit)."""
    max_trials: int | None = None
    """At most this many trials (this run and earlier, resumed ones together)."""
    stop_margin: float = 0.15
    """Early stop: a candidate is skipped when even `(1 + stop_margin) ×` its predicted metric
    cannot beat the best measured one (see docs/auto_tuning.md)."""
    run_best: bool = False
    """Launch the best configuration (action=run) when the search ends."""
    poll_interval_s: float = 1.0
    """Seconds between two looks at a running trial."""

    def __post_init__(self) -> None:
        if self.iterations < 2:
            raise ConfigError("experiment.auto_tuner.control.iterations must be at least 2")
        if not 0 <= self.warmup_iterations < self.iterations:
            raise ConfigError("experiment.auto_tuner.control.warmup_iterations must be >= 0 and smaller than "
                              f"iterations ({self.iterations}); set e.g. warmup_iterations: {self.iterations // 4}")
        for name in ("trial_timeout_s", "max_time_s", "poll_interval_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"experiment.auto_tuner.control.{name} must be > 0, got {value}")
        if self.max_trials is not None and self.max_trials < 1:
            raise ConfigError("experiment.auto_tuner.control.max_trials must be >= 1 (or remove it)")
        if self.stop_margin < 0:
            raise ConfigError("experiment.auto_tuner.control.stop_margin must be >= 0 (0 = strictest early stop)")


@dataclass(slots=True, kw_only=True)
class PerformanceConfig:
    """What "fastest" means: a metric of the training program's metrics.jsonl."""

    metric: str = "tokens_per_s"
    """tokens_per_s (higher is better) or step_time_ms (lower is better)."""
    cost_model: str = AUTO
    """Prior of the trial-order cost model: cpu, gpu, or auto (gpu when the hosts have one)."""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"experiment.auto_tuner.performance.metric must be one of {', '.join(METRICS)}, "
                              f"got '{self.metric}'")
        if self.cost_model not in COST_MODELS:
            raise ConfigError(f"experiment.auto_tuner.performance.cost_model must be one of "
                              f"{', '.join(COST_MODELS)}, got '{self.cost_model}'")

    @property
    def higher_is_better(self) -> bool:
        """True for throughput metrics."""
        return METRICS[self.metric]


@dataclass(slots=True, kw_only=True)
class MemoryModelConfig:
    """A per-process memory budget; candidates whose estimate exceeds it never run."""

    device_memory_mb: float
    """Memory one process may use (e.g. 81920 for an 80 GiB GPU)."""
    baseline_mb: float = 0.0
    """Memory per process the estimate does not model: CUDA context and allocator slack on GPUs,
    the interpreter + torch + Megatron resident set on CPU."""
    vocab_size: int | None = None
    """Tokenizer vocabulary (default: read from train.*.tokenizer_model or vocab_size)."""
    utilization: list[float] = field(default_factory=lambda: [0.0, 1.0])
    """[min, max] fractions of device_memory_mb a candidate's estimate must lie between (upstream's
    gpu_utilization): above max it would not fit, below min it leaves the device underused."""

    def __post_init__(self) -> None:
        if self.device_memory_mb <= 0 or self.baseline_mb < 0:
            raise ConfigError("experiment.auto_tuner.memory_model: device_memory_mb must be > 0 and baseline_mb >= 0")
        if self.baseline_mb >= self.device_memory_mb:
            raise ConfigError(f"experiment.auto_tuner.memory_model.baseline_mb ({self.baseline_mb}) leaves no room "
                              f"in device_memory_mb ({self.device_memory_mb}); lower baseline_mb")
        low_high = self.utilization
        if (len(low_high) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in low_high)
                or not 0 <= low_high[0] < low_high[1] <= 1):
            raise ConfigError(f"experiment.auto_tuner.memory_model.utilization must be [min, max] with "
                              f"0 <= min < max <= 1 (e.g. [0.5, 0.9]), got {low_high!r}")

    def bounds_mb(self) -> tuple[float, float]:
        """The (lowest, highest) memory estimate a candidate may have."""
        return self.utilization[0] * self.device_memory_mb, self.utilization[1] * self.device_memory_mb


@dataclass(slots=True, kw_only=True)
class AutoTunerConfig:
    """experiment.auto_tuner."""

    space: SpaceConfig = field(default_factory=SpaceConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    memory_model: MemoryModelConfig | None = None
    """Optional: prune candidates whose memory estimate exceeds device_memory_mb."""
    notes: list[str] = field(default_factory=list)
    """Not a key: how upstream FlagScale's keys in the block were read (the tuner prints them)."""


SECTIONS: dict[str, type] = {"space": SpaceConfig, "control": ControlConfig, "performance": PerformanceConfig,
                             "memory_model": MemoryModelConfig}


def check_keys(block: Mapping[str, Any]) -> None:
    """Unknown keys (neither this tuner's nor upstream's) are errors suggesting the closest of both."""
    known = [*SECTIONS, *upstream.SECTION_KEYS[""]]
    for key, value in block.items():
        if key not in known:
            raise ConfigError(unknown_key_message(f"experiment.auto_tuner.{key}", key, known))
        if key in SECTIONS and isinstance(value, Mapping):
            section = [f.name for f in fields(SECTIONS[key])] + list(upstream.SECTION_KEYS.get(key, ()))
            for name in value:
                if name not in section:
                    raise ConfigError(unknown_key_message(f"experiment.auto_tuner.{key}.{name}", name, section))


def load_tuner_config(block: Mapping[str, Any] | None) -> AutoTunerConfig:
    """Validate `experiment.auto_tuner` (None = every default, which needs no memory model); upstream
    FlagScale's keys are read as this tuner's (see upstream.py) and noted in `notes`."""
    if block is not None and not isinstance(block, Mapping):
        raise ConfigError(f"experiment.auto_tuner must be a mapping, got {block!r}")
    check_keys(block or {})
    data, notes = upstream.translate(block or {})
    memory = data.pop("memory_model", None)  # build() takes a dataclass or None, not an optional dataclass
    config: AutoTunerConfig = build(AutoTunerConfig, data, "experiment.auto_tuner")
    config.notes = notes
    if memory is not None:
        if not isinstance(memory, Mapping):
            raise ConfigError(f"experiment.auto_tuner.memory_model must be a mapping, got {memory!r}")
        if "device_memory_mb" not in memory:
            raise ConfigError("experiment.auto_tuner.memory_model needs device_memory_mb (memory per process, MB)")
        config.memory_model = build(MemoryModelConfig, memory, "experiment.auto_tuner.memory_model")
    return config
