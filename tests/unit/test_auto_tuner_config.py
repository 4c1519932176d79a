"""The experiment.auto_tuner block: defaults, unknown keys with suggestions, and value checks that name the fix."""

from __future__ import annotations

import pytest

from flagscale.auto_tuner.config import load_tuner_config
from flagscale.exceptions import ConfigError


def test_defaults_search_tp_pp_dp_mbs_and_keep_the_rest() -> None:
    config = load_tuner_config(None)
    dims = config.space.dimensions()
    assert {k for k, v in dims.items() if v == "auto"} == {
        "data_parallel_size", "tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size"}
    assert dims["recompute_granularity"] is None and config.memory_model is None
    assert config.performance.metric == "tokens_per_s" and config.performance.higher_is_better


def test_full_block_is_read() -> None:
    config = load_tuner_config({
        "space": {"tensor_model_parallel_size": [1, 2], "recompute_granularity": [None, "full"]},
        "control": {"iterations": 10, "warmup_iterations": 2, "max_trials": 5, "run_best": True},
        "performance": {"metric": "step_time_ms"},
        "memory_model": {"device_memory_mb": 1024, "baseline_mb": 100},
    })
    assert config.space.tensor_model_parallel_size == [1, 2]
    assert config.control.max_trials == 5 and config.control.run_best
    assert not config.performance.higher_is_better
    assert config.memory_model is not None and config.memory_model.device_memory_mb == 1024.0


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"spaces": {}}, "unknown key 'experiment.auto_tuner.spaces'; did you mean 'space'?"),
        ({"space": {"micro_batch_sizes": [1]}}, "did you mean 'micro_batch_size'?"),
        ({"control": {"iteration": 5}}, "did you mean 'iterations'?"),
        ({"memory_model": {"device_memory": 5}}, "needs device_memory_mb"),
        ({"memory_model": {"device_memory_mb": 5, "baseline": 1}}, "did you mean 'baseline_mb'?"),
        ({"space": {"tensor_model_parallel_size": "all"}}, "must be 'auto' or a list"),
        ({"space": {"micro_batch_size": []}}, "is an empty list"),
        ({"space": {"micro_batch_size": 4}}, "must be list or str"),
        ({"control": {"iterations": 10, "warmup_iterations": 10}}, "smaller than iterations (10)"),
        ({"control": {"max_trials": 0}}, "max_trials must be >= 1"),
        ({"control": {"trial_timeout_s": -1}}, "trial_timeout_s must be > 0"),
        ({"performance": {"metric": "mfu"}}, "metric must be one of tokens_per_s, step_time_ms"),
        ({"performance": {"cost_model": "tpu"}}, "cost_model must be one of"),
        ({"memory_model": {"device_memory_mb": 100, "baseline_mb": 200}}, "lower baseline_mb"),
    ],
)
def test_bad_blocks_are_errors_that_name_the_fix(block: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_tuner_config(block)
    assert message in str(err.value)
