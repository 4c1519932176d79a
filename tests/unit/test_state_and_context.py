"""Job-state derivation, config locating, schema errors and per-host process counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from flagscale.config.hostfile import Host
from flagscale.config.loader import ConfigSource, load_job_config
from flagscale.config.schema import ExperimentConfig, build
from flagscale.exceptions import ConfigError
from flagscale.launcher.launcher import HostStatus, job_state
from flagscale.main import compose_config
from flagscale.runner.base import PlanContext
from flagscale.spec.record import JobState
from tests.conftest import REPO

H = Host(name="h", slots=1)


def _states(*states: JobState) -> list[HostStatus]:
    return [HostStatus(host=H, state=s) for s in states]


@pytest.mark.parametrize(
    ("states", "stop_requested", "expected"),
    [
        ((JobState.COMPLETED, JobState.COMPLETED), False, JobState.COMPLETED),
        ((JobState.RUNNING, JobState.COMPLETED), False, JobState.RUNNING),
        ((JobState.RUNNING, JobState.FAILED), False, JobState.FAILED),
        ((JobState.STOPPED, JobState.STOPPED), True, JobState.STOPPED),
        ((JobState.FAILED, JobState.FAILED), True, JobState.STOPPED),
        ((JobState.FAILED, JobState.COMPLETED), False, JobState.FAILED),
        ((JobState.UNKNOWN, JobState.STOPPED), True, JobState.UNKNOWN),
        ((), False, JobState.UNKNOWN),
    ],
)
def test_job_state(states: tuple, stop_requested: bool, expected: JobState) -> None:
    assert job_state(_states(*states), stop_requested) is expected


def test_locate_names_the_file_that_set_the_key(tmp_path: Path) -> None:
    """The same leaf name in several files: the one composed last under that key wins, not the first match."""
    (tmp_path / "train").mkdir()
    (tmp_path / "a.yaml").write_text("defaults:\n  - train: big\n  - _self_\nx:\n  num_layers: 2\n"
                                     "train:\n  model:\n    seq_length: 8\n")
    (tmp_path / "train" / "big.yaml").write_text("model:\n  num_layers: 2\n  seq_length: 4\n")
    (tmp_path / "train" / "small.yaml").write_text("model:\n  num_layers: 1\n")
    source = ConfigSource(config_dir=tmp_path, config_name="a", overrides=("train.model.lr=1",),
                          choices=(("train", "big"),))
    assert source.locate("train.model.num_layers") == f"{tmp_path}/train/big.yaml:2"
    assert source.locate("train.model.seq_length") == f"{tmp_path}/a.yaml:8"  # _self_ after the group
    assert source.locate("x.num_layers") == f"{tmp_path}/a.yaml:5"
    assert source.locate("train.model.lr") == "command-line override 'train.model.lr=1'"
    assert source.locate("train.model.nope") == f"{tmp_path}/a.yaml:7"  # the closest enclosing key
    assert source.locate("nope") == "the composed config"


def test_schema_rejects_wrong_types_and_unknown_backends() -> None:
    with pytest.raises(ConfigError, match="experiment.runner.no_shared_fs must be bool"):
        build(ExperimentConfig, {"runner": {"no_shared_fs": "yes"}}, "experiment")
    with pytest.raises(ConfigError, match="backend must be 'torchrun' or 'direct'"):
        build(ExperimentConfig, {"runner": {"backend": "mpirun"}}, "experiment")
    with pytest.raises(ConfigError, match="task.type 'finetune' is unknown"):
        build(ExperimentConfig, {"task": {"type": "finetune"}}, "experiment")


def _ctx(overrides: list[str]) -> PlanContext:
    cfg, source = compose_config(REPO / "examples/tiny_gpt/conf", "train", overrides)
    return PlanContext(job=load_job_config(cfg, source), hosts=[], run_id="r", master_port=None)


def test_nproc_capped_by_slots_and_visible_devices() -> None:
    ctx = _ctx(["experiment.runner.nproc_per_node=8",
                "+experiment.envs.device_type_specific.B.CUDA_VISIBLE_DEVICES='0,1,2'",
                "+experiment.runner.device_type_specific={C: {nproc_per_node: 1}}"])
    assert ctx.nproc(Host(name="a", slots=4)) == 4
    assert ctx.nproc(Host(name="b", slots=8, type="B")) == 3
    assert ctx.nproc(Host(name="c", slots=8, type="C")) == 1


def test_dryrun_nproc_uses_the_config_envs_not_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a connection only the config's env layers can say what a host sees; the launching shell's
    CUDA_VISIBLE_DEVICES says nothing about another host."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    ctx = _ctx(["experiment.runner.nproc_per_node=4"])
    assert ctx.nproc(Host(name="a", slots=4)) == 4


def test_nproc_capped_by_what_each_host_reports() -> None:
    ctx = _ctx(["experiment.runner.nproc_per_node=4", "+experiment.envs.CUDA_VISIBLE_DEVICES='0'"])
    a, b = Host(name="a", slots=4), Host(name="b", slots=4)
    ctx.host_devices = {a: 2, b: None}  # a: its own CUDA_VISIBLE_DEVICES lists 2; b: sets none
    assert ctx.nproc(a) == 2 and ctx.nproc(b) == 4
