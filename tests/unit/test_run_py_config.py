"""run.py composition, overrides and validation: one clear line, non-zero exit, nothing started."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_py
from tests.helpers.jobs import dryrun_scripts

TINY = ("--config-path", "examples/tiny_gpt/conf", "--config-name", "train")


def _err(proc) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_unknown_task_key_suggests_and_names_file(tmp_path: Path) -> None:
    proc = run_py(*TINY, "action=dryrun", f"experiment.exp_dir={tmp_path}", "+train.model.num_layer=3")
    err = _err(proc)
    assert "unknown key 'train.model.num_layer'" in err and "did you mean 'num_layers'" in err
    assert "command-line override" in err


def test_unknown_experiment_key_names_yaml_file(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "train").mkdir(parents=True)
    text = Path("examples/tiny_gpt/conf/train.yaml").read_text().replace("nproc_per_node: 2", "nproc_per_nod: 2")
    (conf / "train.yaml").write_text(text)
    (conf / "train" / "tiny.yaml").write_text(Path("examples/tiny_gpt/conf/train/tiny.yaml").read_text())
    err = _err(run_py("--config-path", str(conf), "--config-name", "train", "action=dryrun"))
    assert "did you mean 'nproc_per_node'" in err and f"{conf}/train.yaml:" in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["action=launch"], "action=launch is not one of"),
        (["train.system.tensor_model_parallel_size=3"], "tensor_model_parallel_size"),
        (["train.model.global_batch_size=10"], "global_batch_size"),
        (["+experiment.runner.hostfile=/nonexistent/hosts"], "hostfile /nonexistent/hosts does not exist"),
        (["experiment.runner.nproc_per_node=0"], "nproc_per_node must be a positive integer"),
    ],
)
def test_invalid_settings(tmp_path: Path, overrides: list[str], message: str) -> None:
    proc = run_py(*TINY, "action=dryrun", f"experiment.exp_dir={tmp_path}", *overrides)
    assert message in _err(proc)
    assert not (tmp_path / "job.json").exists()


def _as_bash_reads(line: str, cwd: Path, env_name: str | None = None) -> list[str]:
    """The words bash makes of a rendered script line (an `export` line: the variable's value), without
    running the command: `set --` takes the words as they would reach the program's argv."""
    if env_name is not None:
        probe = f'{line}; printf "%s\\0" "${env_name}"'
    else:
        probe = f'set -- {line}; printf "%s\\0" "$@"'
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30, check=True, cwd=cwd)
    return done.stdout.split("\0")[:-1]


def test_dryrun_passes_values_literally(tmp_path: Path) -> None:
    """A value full of shell syntax reaches the environment and the argv exactly as written: quoted in the
    rendered script, and read back by bash as the same single word."""
    evil = "$(touch pwned) a'b `id` \"q\" ;&|<>*"
    proc = run_py(*TINY, "action=dryrun", f"experiment.exp_dir={tmp_path}", "train.model.num_layers=2",
                  f"+experiment.envs.EVIL='{_hydra_escape(evil)}'",
                  f"+train.system.wandb_exp_name='{_hydra_escape(evil)}'")
    assert proc.returncode == 0, proc.stderr
    assert "torchrun --nnodes 1 --nproc-per-node 2" in proc.stdout
    lines = (dryrun_scripts(tmp_path) / "localhost.sh").read_text().splitlines()
    export = next(line for line in lines if line.startswith("export EVIL="))
    assert export == f"export EVIL={shlex.quote(evil)}"
    assert _as_bash_reads(export, tmp_path, "EVIL") == [evil]
    command = next(line for line in lines if "--num-layers 2" in line)
    assert f"--wandb-exp-name {shlex.quote(evil)}" in command
    argv = _as_bash_reads(command, tmp_path)
    assert argv[argv.index("--wandb-exp-name") + 1] == evil
    printed = shlex.split(proc.stdout.split("command: ", 1)[1].splitlines()[0])
    assert printed == argv  # the command dryrun prints is the argv the host runs
    assert not (tmp_path / "job.json").exists() and not (tmp_path / "pwned").exists()


def _hydra_escape(value: str) -> str:
    """Quote a value for Hydra's override grammar (single-quoted, backslash escapes)."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def test_aquila_composes_and_dryruns(tmp_path: Path) -> None:
    proc = run_py("--config-path", "examples/aquila/conf", "--config-name", "train_cluster", "action=dryrun",
                  f"experiment.exp_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.replace("\n", " ")
    for expected in ("--nproc-per-node 8", "--node-rank 1", "--master-addr node1", "--fp16", "--monitor-interval 5",
                     "--use-distributed-optimizer", "--tensor-model-parallel-size 1", "--num-layers 32",
                     "runs inside container flagscale_train", "--seed 42"):
        assert expected in out
    scripts = sorted(p.name for p in dryrun_scripts(tmp_path).iterdir())
    assert scripts == ["node1.sh", "node2.sh"]
    node2 = (dryrun_scripts(tmp_path) / "node2.sh").read_text()
    assert "export NCCL_DEBUG=INFO" in node2 and "export NCCL_SOCKET_IFNAME=eth0" in node2
    assert "source /opt/flagscale/.venv/bin/activate" in node2
