"""The experiment.auto_tuner block: defaults, unknown keys with suggestions, value checks that name the fix,
and upstream FlagScale's auto_tuner blocks: read where this tuner can honour them, refused one line per key
where it cannot."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from flagscale.auto_tuner import rules
from flagscale.auto_tuner.config import load_tuner_config
from flagscale.auto_tuner.space import generate
from flagscale.exceptions import ConfigError
from tests.unit.test_auto_tuner_rules import CURRENT, TINY


def test_defaults_search_tp_pp_dp_ep_mbs_and_keep_the_rest() -> None:
    config = load_tuner_config(None)
    dims = config.space.dimensions()
    assert {k for k, v in dims.items() if v == "auto"} == {  # ep: auto is [1] for a dense model
        "data_parallel_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
        "expert_model_parallel_size", "micro_batch_size"}
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
        ({"memory_model": {"device_memory": 5}}, "did you mean 'device_memory_mb'?"),
        ({"memory_model": {"baseline_mb": 5}}, "needs device_memory_mb"),
        ({"memory_model": {"device_memory_mb": 5, "utilization": [0.9, 0.5]}}, "0 <= min < max <= 1"),
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


# Upstream FlagScale's train auto-tuner blocks, in the shape of its examples/*/conf/*auto_tuner.yaml.
UPSTREAM_AQUILA = """
experiment:
  auto_tuner:
    space:
      data_parallel_size: "auto"
      use_distributed_optimizer: [true, false]
      tensor_model_parallel_size: [2, 4, 8]
      sequence_parallel: [true]
      pipeline_model_parallel_size: "auto"
      num_layers_per_virtual_pipeline_stage: [1]
      context_parallel_size: "auto"
      expert_model_parallel_size: [1]
      micro_batch_size: "auto"
      use_recompute: [true]
      recompute_method: "auto"
      recompute_granularity: "auto"
      recompute_num_layers: "auto"
    control:
      max_time_per_task: 300
      train_iters: 5
      max_time: 600
"""
UPSTREAM_QWEN3 = """
experiment:
  auto_tuner:
    space:
      data_parallel_size: auto
      use_distributed_optimizer: [true]
      tensor_model_parallel_size: [1, 2, 4, 8]
      expert_model_parallel_size: [1]
      sequence_parallel: [true]
      pipeline_model_parallel_size: [1, 2, 4]
      num_layers_per_virtual_pipeline_stage: auto
      context_parallel_size: [1]
      micro_batch_size: [1, 2, 4, 8]
      use_recompute: auto
      recompute_method: auto
      recompute_granularity: auto
      recompute_num_layers: auto
    control:
      max_time_per_task: 200
      train_iters: 3
      # max_time: 600
    memory_model:
      model_name: default
      gpu_memory: 80000
      gpu_utilization: [0.5, 0.9] # min-max
"""
UPSTREAM_DEEPSEEK = """
experiment:
  auto_tuner:
    space:
      data_parallel_size: auto
      use_distributed_optimizer: auto
      tensor_model_parallel_size: [1, 2, 4, 8]
      expert_model_parallel_size: [1, 2, 4, 8]
      sequence_parallel: [true]
      pipeline_model_parallel_size: [1, 2, 4]
      num_layers_per_virtual_pipeline_stage: [0] # turn off vpp
      context_parallel_size: [1]
      micro_batch_size: [1, 2, 4]
      use_recompute: [false]
    control:
      run_best: false
      max_time_per_task: 200
      train_iters: 3
    memory_model:
      model_name: default
      gpu_memory: 80000
      gpu_utilization: [0.5, 0.88] # min-max
"""
UPSTREAM_HETERO = """
experiment:
  auto_tuner:
    space:
      hetero_pipeline_layer_split: "auto"
      hetero_process_meshes: [[1,2], 1, 1, 'auto', 'auto', 'auto', 1, 1, 'auto', 'auto']
      use_distributed_optimizer: [true, false]
      sequence_parallel: [true]
      micro_batch_size: [1,2]
      use_recompute: [false]
    control:
      max_time_per_task: 600
      train_iters: 5
      max_time: 10000
"""
UPSTREAM_SERVE = """
experiment:
  auto_tuner:
    space:
      tensor_model_parallel_size: "auto"
      pipeline_model_parallel_size: [1, 2]
      block_size: [8, 16, 32]
      max_num_batched_tokens: [512, 1024, 2048]
      max_num_seqs: [128, 256]
    control:
      interval: 10
      run_best: False
"""


def upstream_block(text: str) -> dict:
    return yaml.safe_load(text)["experiment"]["auto_tuner"]


def test_upstream_aquila_block_loads_with_its_keys_mapped() -> None:
    config = load_tuner_config(upstream_block(UPSTREAM_AQUILA))
    control, space = config.control, config.space
    assert (control.trial_timeout_s, control.iterations, control.max_time_s) == (300.0, 5, 600.0)
    assert control.warmup_iterations == 1  # upstream averages all but the first iteration
    assert space.recompute_granularity == ["selective", "full"]  # use_recompute: [true]; granularity auto
    assert space.recompute_method == "auto" and space.num_layers_per_virtual_pipeline_stage == [1]
    notes = "\n".join(config.notes)
    for key in ("control.max_time_per_task", "control.train_iters", "control.max_time", "space.use_recompute"):
        assert f"experiment.auto_tuner.{key}" in notes


def test_upstream_qwen3_block_maps_the_memory_model() -> None:
    config = load_tuner_config(upstream_block(UPSTREAM_QWEN3))
    assert config.space.recompute_granularity == [None, "selective", "full"]  # use_recompute: auto
    memory = config.memory_model
    assert memory is not None and memory.device_memory_mb == 80000 and memory.utilization == [0.5, 0.9]
    assert memory.bounds_mb() == (40000.0, 72000.0)
    assert any("model_name: default" in note for note in config.notes)


def test_upstream_deepseek_block_turns_interleaving_and_recompute_off() -> None:
    config = load_tuner_config(upstream_block(UPSTREAM_DEEPSEEK))
    assert config.space.num_layers_per_virtual_pipeline_stage == [None]
    assert config.space.recompute_granularity == [None]
    assert config.space.expert_model_parallel_size == [1, 2, 4, 8] and not config.control.run_best


def test_upstream_space_generates_candidates() -> None:
    config = load_tuner_config(upstream_block(UPSTREAM_AQUILA))
    world8 = dataclasses.replace(TINY, world_size=8, num_layers=8, num_attention_heads=8, num_query_groups=8,
                                 global_batch_size=32, device="cuda")
    candidates = [c for c in generate(config.space, world8, CURRENT) if not rules.check(c, world8)]
    assert candidates and all(c.tp in (2, 4, 8) and c.sp and c.recompute in ("selective", "full")
                              and c.vpp_layers == 1 and c.pp > 1 for c in candidates)


@pytest.mark.parametrize(
    ("text", "keys"),
    [
        (UPSTREAM_HETERO, ["space.hetero_pipeline_layer_split: heterogeneous (hetero) search",
                           "space.hetero_process_meshes: heterogeneous"]),
        (UPSTREAM_SERVE, ["space.block_size: a dimension of the serving auto-tuner",
                          "space.max_num_batched_tokens", "space.max_num_seqs"]),
    ],
)
def test_upstream_features_this_tuner_lacks_end_in_one_line_per_key(text: str, keys: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_tuner_config(upstream_block(text))
    lines = str(err.value).splitlines()
    for key in keys:
        assert sum(f"experiment.auto_tuner.{key}" in line for line in lines) == 1, key


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"platform": {"airs_switch": True}}, "platform.airs_switch: the AIRS (Jiuding) platform hook"),
        ({"algo": {"name": "grid", "priority": "memory"}}, "algo.priority: 'memory' orders upstream's grid"),
        ({"algo": {"name": "bayes"}}, "algo.name: 'bayes' is not a search of this tuner"),
        ({"memory_model": {"model_name": "llama", "gpu_memory": 80000}}, "memory_model.model_name: 'llama'"),
        ({"performance": {"name": "some log line:"}}, "performance.name: upstream's log pattern"),
        ({"performance": {"metric": "tokens_per_s", "order": "ascend"}}, "performance.order: ascend means metric"),
        ({"args_mapping": {"micro_batch_size": "mbs"}}, "args_mapping: trial values are written"),
        ({"nproc_per_node": 8}, "nproc_per_node: filled in by upstream's tuner"),
        ({"control": {"max_time": 5, "max_time_s": 6}}, "set only one of max_time (upstream's name) and max_time_s"),
        ({"control": {"max_time_per_tsk": 5}}, "did you mean 'max_time_per_task'?"),
        ({"space": {"use_recompute": "yes"}}, "use_recompute must be 'auto' or a list of true/false"),
        ({"space": {"use_recompute": [True], "recompute_granularity": [None]}}, "needs recompute_granularity"),
        ({"notes": ["x"]}, "unknown key 'experiment.auto_tuner.notes'"),
    ],
)
def test_upstream_keys_refused_or_wrong_name_the_key(block: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_tuner_config(block)
    assert message in str(err.value)


def test_upstream_reporting_and_search_keys_with_a_meaning_here_are_read() -> None:
    config = load_tuner_config({"performance": {"name": "elapsed time per iteration \\(ms\\):", "order": "ascend"},
                                "algo": {"name": "grid", "priority": None}, "platform": {"airs_switch": False},
                                "control": {"interval": 5}})
    assert config.performance.metric == "step_time_ms" and not config.performance.higher_is_better
    assert config.control.stop_margin == 1e9 and config.control.poll_interval_s == 5.0
    assert any("platform" in note for note in config.notes)
    assert load_tuner_config({"performance": {"order": "descend"}}).performance.metric == "tokens_per_s"
