"""The shared layout rules (flagscale/config/layout.py): each rule rejects with a message naming the
Megatron argument names and values, valid layouts pass, and the training program's argument check
and the auto-tuner's pruning give the same verdict on a grid of layouts."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import subprocess
import sys

import pytest

from flagscale.auto_tuner import rules
from flagscale.auto_tuner.space import Candidate
from flagscale.auto_tuner.workload import Workload
from flagscale.config.layout import (
    CONTEXT_PARALLEL_NEEDS_TE,
    Layout,
    ModelShape,
    problems,
)
from flagscale.exceptions import ConfigError
from flagscale.train import arguments
from tests.conftest import REPO

MODEL = ModelShape(num_layers=8, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=512, seq_length=128)


def model(**kw: object) -> ModelShape:
    return dataclasses.replace(MODEL, **kw)


def found(world: int | None = 8, device: str = "auto", shape: ModelShape = MODEL, **layout: object) -> list[str]:
    return problems(Layout(**layout), shape, world, device)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tensor_model_parallel_size": 0}, "tensor_model_parallel_size (0) must be >= 1"),
        ({"micro_batch_size": 0}, "micro_batch_size (0) must be >= 1"),
        ({"tensor_model_parallel_size": 3}, "context_parallel_size (1) = 3 does not divide the world size 8"),
        ({"data_parallel_size": 2, "tensor_model_parallel_size": 2}, "= 4 is not the world size 8"),
        ({"tensor_model_parallel_size": 8, "shape": model(num_attention_heads=12, num_query_groups=None)},
         "num_attention_heads (12) is not divisible by tensor_model_parallel_size (8)"),
        ({"tensor_model_parallel_size": 8}, "num_query_groups (4) is not divisible by tensor_model_parallel_size (8)"),
        ({"tensor_model_parallel_size": 2, "shape": model(ffn_hidden_size=511)},
         "ffn_hidden_size (511) is not divisible by tensor_model_parallel_size (2)"),
        ({"expert_model_parallel_size": 2}, "expert_model_parallel_size (2) > 1 needs a model with experts"),
        ({"expert_model_parallel_size": 4, "shape": model(num_experts=6)},
         "num_experts (6) is not divisible by expert_model_parallel_size (4)"),
        ({"expert_model_parallel_size": 4, "pipeline_model_parallel_size": 4, "shape": model(num_experts=8)},
         "pipeline_model_parallel_size (4) = 16 does not divide the world size 8"),
        ({"expert_model_parallel_size": 2, "expert_tensor_parallel_size": 8, "shape": model(num_experts=8)},
         "expert_tensor_parallel_size (8)"),
        ({"sequence_parallel": True, "tensor_model_parallel_size": 4, "shape": model(seq_length=130)},
         "sequence_parallel needs seq_length (130) divisible by tensor_model_parallel_size (4)"),
        ({"context_parallel_size": 2}, CONTEXT_PARALLEL_NEEDS_TE),
        ({"context_parallel_size": 2, "shape": model(seq_length=130)},
         "seq_length (130) is not divisible by 2 × context_parallel_size (2 × 2)"),
        ({"pipeline_model_parallel_size": 8, "shape": model(num_layers=12)},
         "num_layers (12) is not divisible by pipeline_model_parallel_size (8)"),
        ({"pipeline_model_parallel_size": 2, "shape": model(num_layers=3, decoder_first_pipeline_num_layers=3)},
         "leaves 0 layers for 1 middle stage(s)"),
        ({"pipeline_model_parallel_size": 4, "shape": model(num_layers=7, decoder_first_pipeline_num_layers=2,
                                                            decoder_last_pipeline_num_layers=2)},
         "leaves 3 layers, not divisible by the 2 middle stage(s)"),
        ({"pipeline_model_parallel_size": 2, "shape": model(decoder_first_pipeline_num_layers=0)},
         "decoder_first_pipeline_num_layers (0) must be >= 1"),
        ({"virtual_pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1,
          "pipeline_model_parallel_size": 2}, "set only one of virtual_pipeline_model_parallel_size"),
        ({"virtual_pipeline_model_parallel_size": 2}, "virtual pipeline stages need pipeline_model_parallel_size > 1"),
        ({"num_layers_per_virtual_pipeline_stage": 3, "pipeline_model_parallel_size": 2},
         "layers per pipeline stage (4) is not divisible by num_layers_per_virtual_pipeline_stage (3)"),
        ({"virtual_pipeline_model_parallel_size": 3, "pipeline_model_parallel_size": 2},
         "num_layers (8) is not divisible by pipeline_model_parallel_size × virtual_pipeline_model_parallel_size"),
        ({"num_layers_per_virtual_pipeline_stage": 1, "pipeline_model_parallel_size": 2,
          "shape": model(decoder_first_pipeline_num_layers=2)},
         "num_layers_per_virtual_pipeline_stage cannot be combined with an uneven pipeline split"),
        ({"virtual_pipeline_model_parallel_size": 2, "pipeline_model_parallel_size": 3,
          "shape": model(num_layers=9, decoder_first_pipeline_num_layers=3)},
         "decoder_first_pipeline_num_layers (3) is not divisible by virtual_pipeline_model_parallel_size (2)"),
        ({"global_batch_size": 12, "micro_batch_size": 2}, "global_batch_size (12) is not divisible by "
         "micro_batch_size (2) × data parallel size (8)"),
        ({"num_layers_per_virtual_pipeline_stage": 2, "pipeline_model_parallel_size": 2, "global_batch_size": 12},
         "(global_batch_size / (micro_batch_size × data parallel size) = 3) divisible by pipeline_model_parallel_size"),
        ({"virtual_pipeline_model_parallel_size": 2, "pipeline_model_parallel_size": 2},  # no global batch: 1 micro
         "= 1) divisible by pipeline_model_parallel_size (2)"),
        ({"overlap_param_gather": True}, "overlap_param_gather needs use_distributed_optimizer"),
    ],
)
def test_each_rule_names_keys_and_values(kwargs: dict, message: str) -> None:
    kwargs = dict(kwargs)
    reasons = found(8, kwargs.pop("device", "auto"), kwargs.pop("shape", MODEL), **kwargs)
    assert any(message in reason for reason in reasons), reasons


@pytest.mark.parametrize(
    ("world", "kwargs"),
    [
        (8, {}),
        (8, {"tensor_model_parallel_size": 4, "sequence_parallel": True, "use_distributed_optimizer": True,
             "overlap_param_gather": True}),
        (8, {"sequence_parallel": True}),  # tp 1: Megatron-LM switches sequence parallelism off
        (8, {"sequence_parallel": True, "tensor_model_parallel_size": 2, "device": "cpu"}),  # CPU shims: exact
        (8, {"sequence_parallel": True, "device": "cpu", "shape": model(seq_length=130)}),  # tp 1: off, no rule
        (8, {"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 2, "global_batch_size": 32}),
        (8, {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2, "micro_batch_size": 2,
             "global_batch_size": 16}),
        (8, {"pipeline_model_parallel_size": 8, "micro_batch_size": 4}),
        (8, {"pipeline_model_parallel_size": 2, "shape": model(num_layers=7, decoder_first_pipeline_num_layers=3)}),
        (8, {"data_parallel_size": 4, "tensor_model_parallel_size": 2, "global_batch_size": 16}),
        (None, {"tensor_model_parallel_size": 4, "global_batch_size": 7}),  # world unknown: no world/batch rules
    ],
)
def test_valid_layouts_pass(world: int | None, kwargs: dict) -> None:
    assert found(world, **kwargs) == []


def test_experts_split_over_data_and_context_ranks() -> None:
    moe = model(num_experts=8)
    assert found(8, shape=moe, expert_model_parallel_size=8) == []
    assert found(8, shape=moe, expert_model_parallel_size=4, tensor_model_parallel_size=2) == []
    assert found(8, shape=moe, expert_model_parallel_size=2, pipeline_model_parallel_size=4) == []
    assert found(8, shape=moe, expert_model_parallel_size=2, pipeline_model_parallel_size=4,
                 tensor_model_parallel_size=2) != []  # ep × etp × pp = 16 > 8 (dp 1 has no ranks to split over)


def test_uneven_split_with_interleaving() -> None:
    shape = model(num_layers=10, decoder_first_pipeline_num_layers=2, decoder_last_pipeline_num_layers=4)
    layout = {"pipeline_model_parallel_size": 3, "global_batch_size": 24}
    assert found(6, shape=shape, virtual_pipeline_model_parallel_size=2, **layout) == []
    assert found(6, shape=shape, virtual_pipeline_model_parallel_size=4, **layout) == [
        "decoder_first_pipeline_num_layers (2) is not divisible by virtual_pipeline_model_parallel_size (4)"]
    odd_middle = model(num_layers=7, decoder_first_pipeline_num_layers=2, decoder_last_pipeline_num_layers=2)
    assert found(6, shape=odd_middle, virtual_pipeline_model_parallel_size=2, **layout) == [
        "layers per middle pipeline stage (3) is not divisible by virtual_pipeline_model_parallel_size (2)"]


def test_from_values_reads_megatron_names_and_ignores_the_rest() -> None:
    values = {"tensor_model_parallel_size": 2, "num_layers": 4, "lr": 1e-3, "global_batch_size": None,
              "sequence_parallel": True, "num_query_groups": None}
    assert Layout.from_values(values) == Layout(tensor_model_parallel_size=2, sequence_parallel=True)
    assert ModelShape.from_values(values) == ModelShape(num_layers=4)
    assert Layout(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).data_parallel(8) == 2
    assert Layout(tensor_model_parallel_size=3).data_parallel(8) is None


def test_layout_imports_without_torch() -> None:
    code = "import sys, flagscale.config.layout as l; l.problems(l.Layout(), l.ModelShape()); " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# The grid both sides judge: models (layers, heads, query groups, ffn, seq) and layouts.
SHAPES = [(4, 4, 4, 256, 64), (6, 6, 2, 192, 48), (8, 8, 8, 176, 96)]
GRID = {
    "world": [1, 2, 4, 6, 8], "tp": [1, 2, 3, 4], "pp": [1, 2, 4], "cp": [1, 2], "vpl": [None, 1, 2],
    "mbs": [1, 2, 4], "gbs": [8, 12], "sp": [False, True], "dist_opt": [False, True], "device": ["auto", "cpu"],
}
BASE_ARGV = ["--hidden-size", "96", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512",
             "--train-iters", "10", "--lr", "1e-3", "--group-query-attention"]


def _program_accepts(base: object, values: dict, world: int) -> bool:
    args = copy.copy(base)
    for key, value in values.items():
        setattr(args, key, value)
    try:
        arguments.validate(args, world)
    except ConfigError:
        return False
    return True


def _combinations() -> list[dict]:
    combos = []
    for shape, values in itertools.product(SHAPES, itertools.product(*GRID.values())):
        combo = dict(zip(GRID, values))
        if combo["world"] % (combo["tp"] * combo["pp"] * combo["cp"]) == 0:  # the tuner derives dp: only these
            combos.append({**combo, "shape": shape})
    return combos


def test_training_validation_and_tuner_pruning_agree_on_a_grid() -> None:
    """For every layout of the grid, train/arguments.validate accepts the trial's values exactly when the
    tuner's rules keep the candidate."""
    base = arguments.build_parser().parse_args(BASE_ARGV)
    verdicts, disagreements = {True: 0, False: 0}, []
    for combo in _combinations():
        layers, heads, groups, ffn, seq = combo["shape"]
        work = Workload(world_size=combo["world"], num_layers=layers, hidden_size=96, ffn_hidden_size=ffn,
                        num_attention_heads=heads, num_query_groups=groups, kv_channels=96 // heads, seq_length=seq,
                        vocab_size=512, make_vocab_size_divisible_by=128, global_batch_size=combo["gbs"],
                        device=combo["device"])
        c = Candidate(dp=combo["world"] // (combo["tp"] * combo["pp"] * combo["cp"]), tp=combo["tp"], pp=combo["pp"],
                      cp=combo["cp"], sp=combo["sp"], vpp_layers=combo["vpl"], mbs=combo["mbs"],
                      dist_opt=combo["dist_opt"])
        tuner_keeps = not rules.check(c, work)
        values = {**c.train_values(False), "num_layers": layers, "num_attention_heads": heads,
                  "num_query_groups": groups, "ffn_hidden_size": ffn, "seq_length": seq,
                  "global_batch_size": combo["gbs"], "device": combo["device"]}
        program_accepts = _program_accepts(base, values, combo["world"])
        verdicts[program_accepts] += 1
        if program_accepts != tuner_keeps:
            disagreements.append((combo, rules.check(c, work)))
    assert not disagreements, disagreements[:5]
    assert verdicts[True] > 100 and verdicts[False] > 100  # the grid exercises both verdicts
