"""Heterogeneous layouts (flagscale/config/hetero.py) and what the train runner does with them today: the meshes'
rank map, hosts put in mesh order by device type with each host's device type on its command line (dryrun), one
line for each bad mesh before anything starts, and a run refused in one line (the training program does not build
heterogeneous meshes yet)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flagscale.config.hetero import assign_hosts, hetero_layout, model_problems
from flagscale.config.hostfile import Host
from flagscale.exceptions import ConfigError
from tests.conftest import run_py

TWO = {"enable_hetero": True, "hetero_process_meshes": [2, 1, 1, 1, 1, 1, 1, 1, 1, 1],
       "hetero_device_types": ["A", "B"], "hetero_pipeline_layer_split": [3, 1]}
MODEL = {"num_layers": 4, "num_attention_heads": 4, "hidden_size": 128, "ffn_hidden_size": 352,
         "global_batch_size": 16, "micro_batch_size": 4}


def test_ranks_are_numbered_mesh_after_mesh_in_megatron_order() -> None:
    layout = hetero_layout(TWO)
    assert layout is not None and layout.world_size == 3 and layout.num_stages == 2
    places = layout.places()
    assert [(p.mesh, p.tp_rank, p.stage, p.layers) for p in places] == [(0, 0, 0, (0, 3)), (0, 1, 0, (0, 3)),
                                                                       (1, 0, 1, (3, 4))]
    dp_pp = hetero_layout({**TWO, "hetero_process_meshes": [1, 1, 1, 2, 2, 1, 1, 1, 1, 1],
                           "hetero_pipeline_layer_split": [2, 1, 1]})
    assert dp_pp is not None
    assert [(p.rank, p.dp_rank, p.stage) for p in dp_pp.places()] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1),
                                                                     (4, 0, 2)]
    assert not model_problems(layout, MODEL)
    assert hetero_layout({"num_layers": 4}) is None


@pytest.mark.parametrize(("values", "message"), [
    ({**TWO, "hetero_process_meshes": [2, 1, 1, 1]}, "needs five numbers per mesh (tp, cp, ep, dp, pp); got 4"),
    ({**TWO, "hetero_process_meshes": [2, 1, 1, 0, 1]}, "must hold whole numbers >= 1"),
    ({**TWO, "hetero_device_types": ["A"]}, "needs one device type per mesh (2)"),
    ({**TWO, "hetero_pipeline_layer_split": [2, 1, 1]}, "has 3 stages, the meshes have 2 (the sum of their pp: 1 + 1)"),
    ({**TWO, "enable_hetero": False}, "is set but enable_hetero is not"),
    ({**TWO, "expert_tensor_parallel_size_per_process_mesh": [1, 1]}, "per-mesh expert tensor parallel size"),
])
def test_bad_meshes_are_one_line(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        hetero_layout(values)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("meshes", "model", "message"), [
    ([3, 1, 1, 1, 1, 1, 1, 1, 1, 1], {}, "mesh 0 (A): tp3 cp1 ep1 dp1 pp1: tp 3 does not divide num_attention_heads 4"),
    ([2, 1, 1, 1, 1, 1, 1, 1, 3, 1], {}, "global_batch_size 16 is not a multiple of micro_batch_size 4 x dp 3"),
    ([2, 1, 1, 1, 1, 1, 2, 1, 1, 1], {}, "context parallelism needs TransformerEngine attention"),
    ([2, 1, 1, 1, 1, 1, 1, 2, 2, 1], {}, "ep 2 needs a MoE model"),
    ([2, 1, 1, 1, 1, 1, 1, 1, 1, 1], {"num_layers": 6}, "[3, 1] sums to 4, num_layers is 6"),
])
def test_meshes_the_model_or_batch_cannot_take(meshes: list[int], model: dict, message: str) -> None:
    layout = hetero_layout({**TWO, "hetero_process_meshes": meshes})
    assert layout is not None
    problems = model_problems(layout, {**MODEL, **model})
    assert any(message in p for p in problems), problems


def test_hosts_are_put_in_mesh_order_by_device_type() -> None:
    layout = hetero_layout(TWO)
    assert layout is not None
    b, a = Host(name="h-b", slots=1, type="B", line=1), Host(name="h-a", slots=2, type="A", line=2)
    assert assign_hosts(layout, [b, a], lambda h: h.slots) == [a, b]
    with pytest.raises(ConfigError, match=r"type A need 2 processes; the hostfile's hosts of type=A run 1 \(h-a "
                                          r"\(line 2\)\)"):
        assign_hosts(layout, [b, Host(name="h-a", slots=1, type="A", line=2)], lambda h: h.slots)
    with pytest.raises(ConfigError, match="host h-c .hostfile line 3. has type=C, which no mesh uses"):
        assign_hosts(layout, [b, a, Host(name="h-c", slots=1, type="C", line=3)], lambda h: h.slots)


HETERO = ["+train.system.hetero.enable_hetero=true", "+train.system.hetero.hetero_process_meshes=[2,1,1,1,1,1,1,1,1,1]",
          "+train.system.hetero.hetero_device_types=[A,B]", "+train.system.hetero.hetero_pipeline_layer_split=[3,1]"]


def test_dryrun_shows_the_rank_map_and_each_hosts_device_type_run_is_refused(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.3 slots=1 type=B\n127.0.0.2 slots=2 type=A\n")
    common = ["--config-path", "examples/tiny_gpt/conf", "--config-name", "train", f"experiment.exp_dir={tmp_path}",
              f"+experiment.runner.hostfile={hostfile}", "experiment.runner.nnodes=2", *HETERO]
    dry = run_py(*common, "action=dryrun")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "host 127.0.0.2 (node rank 0" in dry.stdout and "host 127.0.0.3 (node rank 1" in dry.stdout
    assert "rank   2 on 127.0.0.3: mesh 1 (B) tp 0 cp 0 dp 0, stage 1 (layers 3-3)" in dry.stdout
    scripts = {p.name: p.read_text() for p in tmp_path.glob("logs/*/scripts/*.sh")}
    assert "--hetero-current-device-type A" in scripts["127.0.0.2.sh"]
    assert "--hetero-current-device-type B" in scripts["127.0.0.3.sh"]
    run = run_py(*common, "action=run")
    assert run.returncode != 0 and "does not build heterogeneous meshes yet" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "job.json").exists()
    bad = run_py(*common[:-4], *HETERO[:2], "+train.system.hetero.hetero_device_types=[A]", HETERO[3],
                 "action=dryrun")
    assert bad.returncode != 0 and "needs one device type per mesh (2)" in bad.stderr
