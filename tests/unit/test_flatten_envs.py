"""Flattening rules (config group -> engine argv) and env layering."""

import pytest

from flagscale.config.envs import layered_env
from flagscale.config.flatten import flatten_leaves, to_argv
from flagscale.exceptions import ConfigError


def test_flatten_rules() -> None:
    group = {
        "system": {"tensor_model_parallel_size": 2, "precision": {"bf16": True, "fp16": False}},
        "model": {"num_layers": 4, "load": None},
        "data": {"data_path": [0.7, "a", 0.3, "b"], "split": "98,1,1"},
    }
    assert to_argv(flatten_leaves(group, "train")) == [
        "--tensor-model-parallel-size", "2", "--bf16", "--num-layers", "4",
        "--data-path", "0.7", "a", "0.3", "b", "--split", "98,1,1",
    ]


def test_duplicate_leaf_names_are_an_error() -> None:
    with pytest.raises(ConfigError, match=r"'lr' is set twice \(train.model.lr and train.optimizer.lr\)"):
        flatten_leaves({"model": {"lr": 1}, "optimizer": {"lr": 2}}, "train")


def test_values_are_passed_literally() -> None:
    argv = to_argv(flatten_leaves({"save": "$(touch /tmp/x) a'b"}, "train"))
    assert argv == ["--save", "$(touch /tmp/x) a'b"]


def test_env_layering_later_wins() -> None:
    envs = {
        "A": 1, "B": "common", "C": True,
        "device_type_specific": {"A100": {"B": "a100", "D": "x"}},
        "node_specific": {"node2": {"D": "node2"}},
    }
    assert layered_env(envs, "A100", "node1") == {"A": "1", "B": "a100", "C": "1", "D": "x"}
    assert layered_env(envs, "A100", "node2") == {"A": "1", "B": "a100", "C": "1", "D": "node2"}
    assert layered_env(envs, None, "node3") == {"A": "1", "B": "common", "C": "1"}


def test_bad_env_name() -> None:
    with pytest.raises(ConfigError, match="not a valid environment variable name"):
        layered_env({"BAD-NAME": 1}, None, "h")
