"""Upstream FlagScale's YAML language: experiment variables, runner options, unsupported sections in one
line, Megatron-LM's vocabulary with argparse semantics, and errors that name the file that set a key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from flagscale.config.loader import load_job_config, select_hosts
from flagscale.exceptions import ConfigError, HostfileError
from flagscale.jobs import prepare
from flagscale.main import compose_config
from flagscale.runner.base import PlanContext, runner_for
from tests.conftest import REPO, run_py

TINY_TASK = (REPO / "examples/tiny_gpt/conf/train/tiny.yaml").read_text()


def _conf(tmp_path: Path, experiment: str, task: str = TINY_TASK, name: str = "train") -> Path:
    """A config folder: `<name>.yaml` (defaults train: tiny) and train/tiny.yaml."""
    conf = tmp_path / "conf"
    (conf / "train").mkdir(parents=True, exist_ok=True)
    (conf / "train" / "tiny.yaml").write_text(task)
    (conf / f"{name}.yaml").write_text("defaults:\n  - train: tiny\n  - _self_\n" + textwrap.dedent(experiment))
    return conf


def _prepare(conf: Path, *overrides: str, name: str = "train"):
    cfg, source = compose_config(conf, name, [*overrides, "action=dryrun"])
    return prepare(load_job_config(cfg, source))


def _plan(conf: Path, *overrides: str, name: str = "train"):
    runner, ctx = _prepare(conf, *overrides, name=name)
    ctx.run_id = "RUNID"
    return runner.plan(ctx)


EXPERIMENT = """
experiment:
  exp_name: t
  exp_dir: {exp_dir}
  seed: 7
  ckpt_format: torch_dist
  task:
    type: train
  runner:
    nnodes: '1'
    nproc_per_node: '2'
    max_restarts: 3
    monitor_interval: 2
train:
  model:
    seed: ${{experiment.seed}}
  system:
    checkpoint:
      ckpt_format: ${{experiment.ckpt_format}}
action: run
"""


def test_user_variables_numbers_as_strings_and_torchrun_options(tmp_path: Path) -> None:
    conf = _conf(tmp_path, EXPERIMENT.format(exp_dir=tmp_path / "exp"))
    plan = _plan(conf)
    argv = plan.processes[0].argv
    assert argv[argv.index("--seed") + 1] == "7"
    assert argv[argv.index("--nproc-per-node") + 1] == "2"
    assert argv[argv.index("--monitor-interval") + 1] == "2"
    assert argv.index("--monitor-interval") < argv.index(str(REPO / "flagscale/train/train_gpt.py"))
    assert "--max-restarts" not in argv  # FlagScale restarts the whole job from its checkpoint, not torchrun


def test_max_restarts_is_the_supervisors(tmp_path: Path) -> None:
    """runner.max_restarts (upstream: a torchrun option) restarts the job from its last checkpoint under
    action=test; torchrun keeps its default of no restarts."""
    conf = _conf(tmp_path, EXPERIMENT.format(exp_dir=tmp_path / "exp"))
    _, ctx = _prepare(conf)
    assert (ctx.job.experiment.runner.max_restarts, ctx.job.experiment.runner.restart_backoff) == (3, 10.0)


def test_unreferenced_experiment_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    conf = _conf(tmp_path, EXPERIMENT.format(exp_dir=tmp_path / "exp").replace("seed: 7", "exp_nme: x\n  seed: 7"))
    with pytest.raises(ConfigError, match=r"unknown key 'experiment.exp_nme'; did you mean 'exp_name'\?.*train.yaml:8"):
        _prepare(conf)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+experiment.runner.log_dir=/x", "FlagScale keeps torchrun's logs"),
        ("+experiment.runner.standalone=true", "FlagScale sets the rendezvous itself"),
        ("+experiment.runner.max_restart=3", "did you mean 'max_restarts'"),
        ("experiment.runner.max_restarts=many", "experiment.runner.max_restarts must be int, got 'many'"),
        ("experiment.runner.monitor_interval=often", "monitor_interval = 'often': expected"),
        ("+experiment.runner.type=cloud", "experiment.runner.type 'cloud' is not supported (supported: ssh, slurm)"),
    ],
)
def test_runner_keys(tmp_path: Path, override: str, message: str) -> None:
    conf = _conf(tmp_path, EXPERIMENT.format(exp_dir=tmp_path / "exp"))
    with pytest.raises(ConfigError) as err:
        _prepare(conf, override)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("experiment.task.type=rl", "experiment.task.type 'rl' is a task this project does not run"),
        ("experiment.task.type=compress", "is a task this project does not run (supported: train, inference, serve)"),
        ("+experiment.task.backend=robotics", "backend 'robotics' is not supported for train (supported: megatron)"),
        ("+compress.x=1", "section 'compress' is for a task this project does not run"),
        ("+experiment.runner.deploy.use_fs_serve=true", "use_fs_serve: true (Ray Serve deployments) is not supported"),
        ("+experiment.runner.deploy.prefill_decode_disaggregation=true", "disaggregation are not supported here"),
        ("+experiment.task.entrypoint=./flagscale/train/train_rwkv.py", "train_rwkv.py does not exist"),
    ],
)
def test_what_this_project_does_not_run_is_one_line(tmp_path: Path, override: str, message: str) -> None:
    conf = _conf(tmp_path, EXPERIMENT.format(exp_dir=tmp_path / "exp"))
    with pytest.raises(ConfigError) as err:
        _prepare(conf, override)
    assert message in str(err.value) and "\n" not in str(err.value) and "unknown key" not in str(err.value)


def test_hostfile_named_but_missing_and_nnodes_without_hostfile(tmp_path: Path) -> None:
    conf = _conf(tmp_path, EXPERIMENT.format(exp_dir=tmp_path / "exp"))
    cfg, source = compose_config(conf, "train", ["+experiment.runner.hostfile=nohosts.txt", "action=dryrun"])
    with pytest.raises(HostfileError, match="hostfile nohosts.txt does not exist"):
        select_hosts(load_job_config(cfg, source))
    cfg, source = compose_config(conf, "train", ["experiment.runner.nnodes=2", "action=dryrun"])
    with pytest.raises(ConfigError, match="nnodes=2 needs a hostfile"):
        select_hosts(load_job_config(cfg, source))


def test_placeholder_names_key_and_file(tmp_path: Path) -> None:
    line = next(x for x in TINY_TASK.splitlines() if x.strip().startswith("data_path:"))
    task = TINY_TASK.replace(line, "  data_path: ${data_path:??}")
    conf = _conf(tmp_path, EXPERIMENT.format(exp_dir=tmp_path / "exp"), task=task)
    proc = run_py("--config-path", str(conf), "--config-name", "train", "action=dryrun")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "train.data.data_path: '${data_path:??}' is a placeholder" in line
    assert f"{conf}/train/tiny.yaml:" in line


def test_leaf_set_twice_last_wins_with_both_places_and_dashes(tmp_path: Path) -> None:
    task = TINY_TASK.replace("  seed: 1234\n", "  seed: 1234\n  weight-decay: 0.5\n")
    experiment = EXPERIMENT.format(exp_dir=tmp_path / "exp").replace("  model:\n    seed: ${experiment.seed}\n", "")
    conf = _conf(tmp_path, experiment.replace("  seed: 7\n", ""), task=task)
    runner, ctx = _prepare(conf)
    argv = runner.plan(ctx).processes[0].argv
    assert argv.count("--weight-decay") == 1 and argv[argv.index("--weight-decay") + 1] == "0.01"
    note = next(n for n in ctx.notes if "'weight_decay' is set twice" in n)
    assert "train.system.weight-decay" in note and "train.model.optimizer.weight_decay" in note
    assert f"{conf}/train/tiny.yaml:8" in note and f"{conf}/train/tiny.yaml:43" in note
    assert "the last one wins" in note


def test_not_implemented_megatron_argument_is_refused_in_one_line(tmp_path: Path) -> None:
    conf = _conf(tmp_path, EXPERIMENT.format(exp_dir=tmp_path / "exp"))
    with pytest.raises(ConfigError) as err:
        _prepare(conf, "+train.model.fp8_format=hybrid", "+train.system.use_dualpipev=true")
    text = str(err.value)
    assert "train.system.use_dualpipev=True: Megatron-LM argument 'use_dualpipev' is not implemented" in text
    assert "command-line override '+train.system.use_dualpipev=true'" in text
    assert "also not implemented yet: fp8_format" in text and "\n" not in text
    # a value Megatron-LM would use anyway is not a different model: accepted
    _prepare(conf, "+train.model.fp8_format=null", "+train.system.use_dualpipev=false")


def test_cuda_only_and_inert_options_are_listed_in_notes(tmp_path: Path) -> None:
    conf = _conf(tmp_path, EXPERIMENT.format(exp_dir=tmp_path / "exp"))
    runner, ctx = _prepare(conf, "+train.model.use_flash_attn=true", "+train.model.no_masked_softmax_fusion=true",
                           "+train.system.logging.wandb_project=p", "+train.system.tp_comm_overlap=true")
    cuda = next(n for n in ctx.notes if n.startswith("CUDA-only"))
    assert "use_flash_attn" in cuda and "no_masked_softmax_fusion" in cuda and "tp_comm_overlap" in cuda
    assert any("wandb_project" in n and "reporting only" in n for n in ctx.notes)
    argv = runner.plan(ctx).processes[0].argv
    assert "--use-flash-attn" in argv and "--tp-comm-overlap" in argv  # passed on: the host decides


def test_directory_defaults_from_exp_dir(tmp_path: Path) -> None:
    task = "\n".join(line for line in TINY_TASK.splitlines() if not line.strip().startswith(("save:", "load:",
                                                                                            "tensorboard_dir")))
    conf = _conf(tmp_path, EXPERIMENT.format(exp_dir=tmp_path / "exp"), task=task)
    argv = _plan(conf).processes[0].argv
    for option, folder in (("--save", "checkpoints"), ("--load", "checkpoints"), ("--tensorboard-dir", "tensorboard"),
                           ("--wandb-save-dir", "wandb")):
        assert argv[argv.index(option) + 1] == str(tmp_path / "exp" / folder)


def test_value_error_names_key_value_and_file(tmp_path: Path) -> None:
    conf = _conf(tmp_path, EXPERIMENT.format(exp_dir=tmp_path / "exp"), task=TINY_TASK.replace("num_layers: 4",
                                                                                               "num_layers: four"))
    with pytest.raises(ConfigError, match=r"train.model.num_layers .*tiny.yaml:\d+\): num_layers = 'four': expected"):
        _prepare(conf)


def test_warmup_longer_than_training_is_refused_before_launch(tmp_path: Path) -> None:
    """Megatron-Core's scheduler would assert in every rank; here it is one line naming the key and file."""
    proc = run_py("--config-path", "examples/tiny_gpt/conf", "--config-name", "train", "action=run",
                  f"experiment.exp_dir={tmp_path}", "train.model.train_iters=20")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "lr_warmup_iters (20) must be smaller than lr_decay_iters (20" in last
    assert "train.model.optimizer.lr_warmup_iters=20, in examples/tiny_gpt/conf/train/tiny.yaml:" in last
    assert not (tmp_path / "job.json").exists()


def test_hydra_run_dir_is_respected(tmp_path: Path) -> None:
    experiment = EXPERIMENT.format(exp_dir=tmp_path / "exp") + "hydra:\n  run:\n    dir: ${experiment.exp_dir}/hydra\n"
    conf = _conf(tmp_path, experiment)
    proc = run_py("--config-path", str(conf), "--config-name", "train", "action=dryrun")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "exp" / "hydra" / ".hydra" / "config.yaml").is_file()


def test_a_yaml_that_does_not_parse_is_one_line(tmp_path: Path) -> None:
    conf = _conf(tmp_path, EXPERIMENT.format(exp_dir=tmp_path / "exp") + "envs:\n  A: 1\n  A: 2\n")
    proc = run_py("--config-path", str(conf), "--config-name", "train", "action=dryrun")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot load {conf}/train.yaml:" in proc.stderr and "duplicate key" in proc.stderr


def test_deploy_port_and_ray_ports_reach_the_serve_plan(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "serve").mkdir(parents=True)
    (conf / "serve" / "m.yaml").write_text("- serve_id: m\n  engine: vllm\n  engine_args:\n    model: /models/m\n"
                                           "  engine_args_specific:\n    vllm:\n      max_model_len: 64\n"
                                           "    llama_cpp:\n      threads: 4\n")
    (conf / "hosts.txt").write_text("node1 slots=1\nnode2 slots=1\n")
    (conf / "serve.yaml").write_text(textwrap.dedent(f"""\
        defaults:
          - serve: m
          - _self_
        experiment:
          exp_name: s
          exp_dir: {tmp_path}/exp
          task:
            type: serve
          deploy:
            port: 9123
          runner:
            hostfile: hosts.txt
            ray_port: 6390
            ray_dashboard_port: 8266
        action: run
        """))
    runner, ctx = _prepare(conf, name="serve")
    assert any("experiment.deploy is upstream's old place" in n for n in ctx.notes)
    plan = runner.plan(ctx)
    server = next(p for p in plan.processes if p.label == "m").argv
    assert server[server.index("--port") + 1] == "9123" and server[server.index("--max-model-len") + 1] == "64"
    assert "--threads" not in server
    head = next(p for p in plan.processes if p.label == "ray" and p.node_rank == 0).argv
    assert head[head.index("--port") + 1] == "6390" and head[head.index("--dashboard-port") + 1] == "8266"


def test_per_node_task_runs_each_host_alone(tmp_path: Path) -> None:
    conf = _conf(tmp_path, EXPERIMENT.format(exp_dir=tmp_path / "exp"))
    (conf / "hosts.txt").write_text("node1 slots=2\nnode2 slots=2\n")
    cfg, source = compose_config(conf, "train", ["+experiment.runner.hostfile=hosts.txt", "experiment.runner.nnodes=2",
                                                 "+experiment.runner.per_node_task=true", "action=dryrun"])
    job = load_job_config(cfg, source)
    ctx = PlanContext(job=job, hosts=select_hosts(job), run_id="RUNID", master_port=29555)
    for spec in runner_for("train").plan(ctx).processes:
        argv = spec.argv
        assert argv[argv.index("--nnodes") + 1] == "1" and argv[argv.index("--node-rank") + 1] == "0"
        assert argv[argv.index("--master-addr") + 1] == "localhost"
