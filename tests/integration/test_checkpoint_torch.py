"""`--ckpt-format torch` (Megatron-LM's legacy per-rank files) under a real torchrun (2 CPU processes):
a data-parallel (and an expert-parallel) run with the distributed optimizer stops, resumes at the same
iteration and ends with the losses of an uninterrupted run; pipeline and expert ranks are named as
Megatron-LM names them; a different tp/pp/ep on resume is one clear line naming both layouts; the HF
converter reads a tp=1 pp=1 checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_convert import _compare, convert
from tests.integration.test_train_program import SMALL_MODEL, data_args, events, torchrun, train_losses

pytestmark = pytest.mark.integration

DP2 = ["--use-distributed-optimizer", "--train-iters", "12", "--log-interval", "2"]


def whole_and_split(data: Path, root: Path, *extra: str) -> Path:
    """One uninterrupted run to 12 (metrics in whole/), and one stopped at 6 in torch format then resumed
    (split/, checkpoints in ckpt/, logs first.log and second.log); returns `root`."""
    common = [*SMALL_MODEL, *data_args(data), *DP2, *extra]
    whole = torchrun(*common, "--metrics-dir", str(root / "whole"))
    assert whole.returncode == 0, whole.stdout[-3000:]
    split = [*common, "--ckpt-format", "torch", "--save", str(root / "ckpt"), "--load", str(root / "ckpt"),
             "--metrics-dir", str(root / "split")]  # fmt: skip
    for name, stop in (("first", ["--exit-interval", "6"]), ("second", [])):
        run = torchrun(*split, *stop)
        assert run.returncode == 0, run.stdout[-3000:]
        (root / f"{name}.log").write_text(run.stdout)
    return root


def assert_resumed_exactly(root: Path) -> None:
    """Resumed at 6, ended at 12, with the uninterrupted run's losses."""
    ckpt = root / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    assert "starting fresh" in (root / "first.log").read_text()
    assert f"resuming from checkpoint {ckpt / 'iter_0000006'} at iteration 6" in (root / "second.log").read_text()
    starts = [e for e in events(root / "split") if e["event"] == "start"]
    assert [(s["start_iteration"], s["train_iters"]) for s in starts] == [(0, 12), (6, 12)]
    expected, got = train_losses(events(root / "whole")), train_losses(events(root / "split"))
    assert sorted(got) == sorted(expected) == list(range(2, 13, 2))
    assert got == pytest.approx(expected, rel=1e-6)


def rank_files(iteration: Path) -> dict[str, list[str]]:
    return {d.name: sorted(f.name for f in d.iterdir()) for d in sorted(iteration.iterdir())}


@pytest.fixture(scope="module")
def dp2_runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return whole_and_split(tiny_data, tmp_path_factory.mktemp("torch_ckpt"))


@pytest.mark.slow
def test_resume_from_torch_format_is_exact(dp2_runs: Path) -> None:
    files = ["distrib_optim.pt", "model_optim_rng.pt"]
    assert rank_files(dp2_runs / "ckpt" / "iter_0000006") == {"mp_rank_00": files}
    assert_resumed_exactly(dp2_runs)


@pytest.mark.slow
def test_expert_parallel_ranks_resume_exactly(tiny_data: Path, tmp_path: Path) -> None:
    """MoE with ep=2: one folder per expert rank (mp_rank_TT_EEE), each with its optimizer state."""
    whole_and_split(tiny_data, tmp_path, "--num-experts", "2", "--expert-model-parallel-size", "2")
    files = ["distrib_optim.pt", "model_optim_rng.pt"]
    assert rank_files(tmp_path / "ckpt" / "iter_0000006") == {"mp_rank_00_000": files, "mp_rank_00_001": files}
    assert_resumed_exactly(tmp_path)
    dense = torchrun(*SMALL_MODEL, *data_args(tiny_data), *DP2, "--num-experts", "2", "--load", str(tmp_path / "ckpt"))
    assert dense.returncode != 0
    assert "was saved with tp=1 pp=1 ep=2 but this run has tp=1 pp=1;" in dense.stdout


@pytest.mark.slow
def test_converter_reads_a_torch_format_checkpoint(dp2_runs: Path) -> None:
    done = convert(dp2_runs / "ckpt", dp2_runs / "hf")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "iteration 12" in done.stdout
    result = _compare(dp2_runs / "ckpt", dp2_runs / "hf")
    assert result["max_abs_diff"] < 1e-4 * max(1.0, result["scale"]), result
    assert result["argmax_equal"], result


@pytest.mark.slow
def test_pipeline_ranks_and_a_changed_layout_is_an_error(tiny_data: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    common = [*SMALL_MODEL, *data_args(tiny_data), "--ckpt-format", "torch", "--save", str(ckpt), "--load", str(ckpt)]
    first = torchrun(*common, "--pipeline-model-parallel-size", "2", "--train-iters", "4")
    assert first.returncode == 0, first.stdout[-3000:]
    assert sorted(p.name for p in (ckpt / "iter_0000004").iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
    second = torchrun(*common, "--tensor-model-parallel-size", "2", "--train-iters", "8")
    assert second.returncode != 0
    assert (
        f"error: checkpoint {ckpt / 'iter_0000004'} (ckpt_format torch) was saved with tp=1 pp=2 but this run has "
        "tp=2 pp=1; a torch checkpoint resumes only with the layout it was saved with (ckpt_format torch_dist reshards)"
    ) in second.stdout
    assert "Traceback" not in second.stdout.split("error: checkpoint")[0]
    done = convert(ckpt, tmp_path / "hf")
    assert done.returncode == 1 and "saved with tp=1 pp=2; the converter reads torch-format" in done.stderr


def test_missing_rank_file_is_named(tmp_path: Path) -> None:
    from flagscale.train import checkpointing

    folder = tmp_path / "iter_0000010"
    for name in ("mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001"):
        (folder / name).mkdir(parents=True)
        (folder / name / "model_optim_rng.pt").touch()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10\n")
    assert checkpointing.torch_layout(folder) == (2, 2, 1) and checkpointing.checkpoint_format(folder) == "torch"
    assert checkpointing.torch_layout(folder, single_suffix_is_expert=True) == (2, 1, 2)
    assert checkpointing.mp_rank_dir(folder, 1, 2, 3).name == "mp_rank_01_002_003"
    assert checkpointing.mp_rank_dir(folder, 1, None, 3).name == "mp_rank_01_003"
    with pytest.raises(checkpointing.CheckpointError, match="incomplete or corrupt: no mp_rank_01_001/model_optim"):
        checkpointing.find_checkpoint(tmp_path)
    (folder / "mp_rank_01_001").mkdir()
    (folder / "mp_rank_01_001" / "model_optim_rng.pt").touch()
    assert checkpointing.find_checkpoint(tmp_path) == (folder, 10)
    empty = tmp_path / "empty"
    (empty / "iter_0000001").mkdir(parents=True)
    with pytest.raises(checkpointing.CheckpointError, match="no mp_rank_\\*/model_optim_rng.pt"):
        checkpointing.find_checkpoint(empty, 1, "torch")
