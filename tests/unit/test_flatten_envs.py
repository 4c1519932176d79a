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


def test_a_leaf_set_twice_follows_argparse_last_wins_and_is_reported() -> None:
    overridden: list[tuple[str, str, str]] = []
    leaves = flatten_leaves({"model": {"lr": 1, "seed": 3}, "optimizer": {"lr": 2}}, "train", overridden)
    assert leaves["lr"] == ("train.optimizer.lr", 2)
    assert overridden == [("lr", "train.model.lr", "train.optimizer.lr")]
    assert to_argv(leaves) == ["--seed", "3", "--lr", "2"]


def test_dashed_spellings_are_the_same_argument() -> None:
    overridden: list[tuple[str, str, str]] = []
    leaves = flatten_leaves({"model": {"seq-length": 8}, "data": {"seq_length": 16}}, "train", overridden)
    assert leaves == {"seq_length": ("train.data.seq_length", 16)}
    assert overridden == [("seq_length", "train.model.seq-length", "train.data.seq_length")]


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
