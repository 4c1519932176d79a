"""Slurm without a cluster: the batch scripts rendered from examples/tiny_gpt/conf/train_slurm.yaml compared with
golden files (tests/golden/slurm/; FLAGSCALE_UPDATE_GOLDEN=1 rewrites them), extra sbatch options checked against
sbatch's own table, and the settings that do not go with a Slurm job refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flagscale import jobs
from flagscale.config.loader import load_job_config
from flagscale.config.sbatch import check_extra_args, options
from flagscale.exceptions import ConfigError, LaunchError
from flagscale.launcher.launcher import Launcher
from flagscale.main import compose_config
from flagscale.spec.plan import shell_word
from tests.conftest import REPO

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "slurm"
CONF = REPO / "examples" / "tiny_gpt" / "conf"


def _job(tmp_path: Path, *overrides: str):
    cfg, source = compose_config(CONF, "train_slurm", [f"experiment.exp_dir={tmp_path / 'exp'}", *overrides,
                                                       "action=dryrun"])
    return load_job_config(cfg, source)


def _written(tmp_path: Path, *overrides: str) -> dict[str, str]:
    """The scripts a dryrun writes (the same call `run` makes), paths and the run id normalized."""
    job = _job(tmp_path, *overrides)
    runner, ctx = jobs.prepare(job)
    ctx.run_id = "RUNID"
    plan = runner.plan(ctx)
    written = Launcher.from_settings(jobs.launcher_settings(job)).write_scripts(plan)
    out = {}
    for path in written:
        text = Path(path).read_text()
        for real, name in ((str(tmp_path), "<TMP>"), (sys.executable, "<PYTHON>"),
                           (str(Path(sys.executable).parent), "<VENV_BIN>"), (str(REPO), "<REPO>")):
            text = text.replace(real, name)
        out[Path(path).name] = text
    return out


CASES = {
    "single_node": ["experiment.runner.nnodes=1"],
    "multi_node": ["+experiment.runner.slurm.account=proj", "+experiment.runner.slurm.qos=normal",
                   "+experiment.runner.slurm.exclusive=true", '+experiment.runner.slurm.extra_sbatch_args=["--mem=0"]',
                   "+experiment.envs.node_specific.n2.NCCL_IB_HCA=mlx5_1", "+experiment.cmds.after_stop=echo done"],
    "device_types": ["+experiment.runner.slurm.device_type=A100", "+experiment.runner.slurm.gpus_per_node=2",
                     "~experiment.runner.slurm.ntasks_per_node", "+experiment.runner.slurm.constraint=a100"],
    "container_image": ["+experiment.runner.slurm.container_image=nvcr.io/nvidia/pytorch:25.01-py3",
                        "+experiment.runner.slurm.container_mounts=/data:/data",
                        "+experiment.runner.master_port=29600"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_batch_scripts_match_golden(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the node scripts cd into the launching directory
    scripts = _written(tmp_path, *CASES[case])
    assert {"sbatch.sh", "slurm-node.sh", "node0.sh"} <= set(scripts)
    for name in ("sbatch.sh", "slurm-node.sh", "node0.sh"):
        golden = GOLDEN / f"{case}_{name}"
        if os.environ.get("FLAGSCALE_UPDATE_GOLDEN"):
            golden.write_text(scripts[name])
        assert golden.is_file(), f"missing {golden}; run with FLAGSCALE_UPDATE_GOLDEN=1"
        assert scripts[name] == golden.read_text(), f"{golden} differs from the rendered script"


def test_every_node_gets_its_rank_and_the_rendezvous_from_the_job(tmp_path: Path) -> None:
    scripts = _written(tmp_path, "experiment.runner.nnodes=4")
    assert sorted(n for n in scripts if n.startswith("node")) == ["node0.sh", "node1.sh", "node2.sh", "node3.sh"]
    for rank in range(4):
        text = scripts[f"node{rank}.sh"]
        assert f"--node-rank {rank} " in text and "--nnodes 4 " in text
        assert '--master-addr "${FLAGSCALE_MASTER_ADDR}" --master-port "${FLAGSCALE_MASTER_PORT}"' in text
        assert f"  {rank}) script=<TMP>/exp/logs/RUNID/scripts/node{rank}.sh;" in scripts["slurm-node.sh"]
    batch = scripts["sbatch.sh"]
    assert "#SBATCH --nodes=4" in batch and "#SBATCH --no-requeue" in batch
    assert batch.index("export FLAGSCALE_MASTER_ADDR") < batch.index("srun ")


def test_device_type_selects_env_and_processes(tmp_path: Path) -> None:
    scripts = _written(tmp_path, *CASES["device_types"])
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in scripts["node0.sh"]
    assert "--nproc-per-node 2 " in scripts["node0.sh"]
    assert "#SBATCH --gpus-per-node=2" in scripts["sbatch.sh"]


def test_only_the_placeholders_expand() -> None:
    """What bash makes of the rendered words: the placeholders become the node's values, nothing else expands."""
    words = ["$(touch /tmp/x) ${HOME} `id`", "@FLAGSCALE_MASTER_ADDR@:@FLAGSCALE_MASTER_PORT@",
             "it's@FLAGSCALE_MASTER_PORT@"]
    script = "printf '%s\\n' " + " ".join(shell_word(w) for w in words)
    env = {"FLAGSCALE_MASTER_ADDR": "10.1.2.3", "FLAGSCALE_MASTER_PORT": "29511", "PATH": os.environ["PATH"]}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines() == ["$(touch /tmp/x) ${HOME} `id`", "10.1.2.3:29511", "it's29511"]


@pytest.mark.parametrize(("args", "message"), [
    (["--mem=4G", "--gres=gpu:8", "-x", "n3", "--exclude=n4", "--nice"], None),
    (["--memory=4G"], "'--memory=4G' is not an option sbatch knows"),
    (["-Z"], "'-Z' is not an option sbatch knows"),
    (["mem=4G"], "'mem=4G' is not an sbatch option"),
    (["--nodes=4"], "set experiment.runner.slurm.nodes"),
    (["-N", "4"], "set experiment.runner.slurm.nodes"),
    (["--output=x.log"], "FlagScale writes the job's output"),
    (["--partition=gpu"], "set experiment.runner.slurm.partition"),
    (["--requeue"], "--no-requeue"),
])
def test_extra_sbatch_args_are_checked_against_sbatch(args: list[str], message: str | None) -> None:
    if message is None:
        check_extra_args(args, "extra_sbatch_args")
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_extra_args(args, "extra_sbatch_args")


def test_the_option_table_is_sbatch_s() -> None:
    table = options()
    assert table["source"].startswith("sbatch --help of slurm")
    assert table["long"]["exclude"] == "required" and table["short"]["x"] == "exclude"
    assert table["long"]["exclusive"] == "optional" and table["long"]["contiguous"] == "none"


@pytest.mark.parametrize(("overrides", "message"), [
    (["+experiment.runner.hostfile=examples/tiny_gpt/conf/hostfile.txt"], "on Slurm the scheduler picks the nodes"),
    (["+experiment.runner.no_shared_fs=true"], "needs exp_dir on a file system every node shares"),
    (["+experiment.runner.docker=ctr"], "use runner.slurm.container_image"),
    (["+experiment.runner.slurm.nodes=3"], "nnodes=2 but runner.slurm.nodes=3"),
    (["experiment.runner.slurm.partition=a b"], "holds white space"),
    (['+experiment.runner.slurm.extra_sbatch_args=["--bogus"]'], "'--bogus' is not an option sbatch knows"),
    (["+experiment.runner.slurm.container_mounts=/d:/d"], "container_mounts needs container_image"),
    (["+experiment.runner.slurm.gpus_per_node=0"], "gpus_per_node must be a positive integer"),
])
def test_settings_that_do_not_fit_a_slurm_job_are_one_line(overrides: list[str], message: str,
                                                           tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        job = _job(tmp_path, *overrides)
        jobs.launcher_settings(job)


def test_without_slurm_s_commands_nothing_is_submitted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(tmp_path)
    launcher = Launcher.from_settings(jobs.launcher_settings(job))
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, srun, ... here
    with pytest.raises(LaunchError, match="Slurm's sbatch, srun, squeue, scancel, sinfo, scontrol not found on this "
                                          "machine; run FlagScale on a login node"):
        launcher.connect_all(jobs.prepare(job)[1].hosts, None, None, None)  # type: ignore[arg-type]
    with pytest.raises(LaunchError, match="not found"):
        jobs.launch(job)
    assert not (tmp_path / "exp" / "job.json").exists()
