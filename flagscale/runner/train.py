"""Train runner: plans torchrun on every host running the Megatron-Core training program."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from flagscale.config.flatten import flatten_leaves, to_argv
from flagscale.config.hostfile import Host
from flagscale.config.schema import unknown_key_message
from flagscale.exceptions import ConfigError
from flagscale.runner.base import REPO_ROOT, PlanContext, TaskRunner
from flagscale.runner.plan import Plan, ProcessSpec
from flagscale.train import arguments as megatron_args

DEFAULT_ENTRYPOINT = "flagscale/train/train_gpt.py"
# Arguments FlagScale fills in itself; setting them in YAML would fight the runner.
RESERVED = {"metrics_dir"}


class TrainRunner(TaskRunner):
    task_type = "train"

    def validate(self, ctx: PlanContext) -> None:
        args = self._parse(ctx)
        world = sum(ctx.nproc(h) for h in ctx.hosts)
        megatron_args.validate(args, world)
        missing = [] if ctx.job.experiment.runner.no_shared_fs else _missing_data(args, ctx)
        if missing and ctx.job.action != "dryrun":
            raise ConfigError(missing[0])
        ctx.notes.extend(missing)

    def plan(self, ctx: PlanContext) -> Plan:
        engine_argv = to_argv(self._leaves(ctx)) + ["--metrics-dir", str(ctx.log_dir)]
        nprocs = [ctx.nproc(h) for h in ctx.hosts]
        notes = ctx.notes + [
            f"host {h.name}: nproc_per_node capped to {n} (slots/visible devices)"
            for h, n in zip(ctx.hosts, nprocs)
            if ctx.job.experiment.runner.nproc_per_node and n < ctx.job.experiment.runner.nproc_per_node
        ]
        processes = [
            ProcessSpec(
                host=host,
                node_rank=rank,
                argv=self._torchrun(ctx, host, rank, nproc) + [self._entrypoint(ctx)] + engine_argv,
                env=_train_env(ctx, host),
                cwd=os.getcwd(),
                log_path=str(ctx.log_dir / f"{host.slug}.log"),
                before_start=ctx.job.experiment.cmds.lines("before_start"),
            )
            for rank, (host, nproc) in enumerate(zip(ctx.hosts, nprocs))
        ]
        return Plan(task_type="train", exp_dir=str(ctx.exp_dir), run_id=ctx.run_id, log_dir=str(ctx.log_dir),
                    processes=processes, after_stop=ctx.job.experiment.cmds.lines("after_stop"),
                    master_addr=ctx.master_addr, master_port=ctx.master_port, info=self.info(ctx), notes=notes)

    def info(self, ctx: PlanContext) -> dict[str, Any]:
        leaves = self._leaves(ctx)
        return {
            "metrics_file": str(ctx.log_dir / "metrics.jsonl"),
            "train_iters": leaves.get("train_iters", (None, None))[1],
            "world_size": sum(ctx.nproc(h) for h in ctx.hosts),
        }

    def _leaves(self, ctx: PlanContext) -> dict[str, tuple[str, Any]]:
        task = ctx.job.task
        if not isinstance(task, dict):
            raise ConfigError("the 'train' section must be a mapping of groups (system, model, data)")
        leaves = flatten_leaves(task, "train")
        known = megatron_args.known_keys()
        for name, (path, _) in leaves.items():
            if name in RESERVED:
                raise ConfigError(f"'{path}' is set by FlagScale itself; remove it (in {ctx.job.source.locate(path)})")
            if name not in known:
                message = unknown_key_message(path, name, list(known))
                raise ConfigError(f"{message} (in {ctx.job.source.locate(path)}); "
                                  "train.* keys are Megatron-LM argument names")
        return leaves

    def _parse(self, ctx: PlanContext) -> argparse.Namespace:
        argv = to_argv(self._leaves(ctx))
        parser = megatron_args.build_parser()
        try:
            return parser.parse_args(argv)
        except SystemExit:
            raise ConfigError(f"the train section does not parse as Megatron arguments: {' '.join(argv)}") from None

    def _entrypoint(self, ctx: PlanContext) -> str:
        entry = Path(ctx.job.experiment.task.entrypoint or DEFAULT_ENTRYPOINT)
        return str(entry if entry.is_absolute() else REPO_ROOT / entry)

    def _torchrun(self, ctx: PlanContext, host: Host, rank: int, nproc: int) -> list[str]:
        runner = ctx.job.experiment.runner
        if runner.backend == "direct":  # the entrypoint once per host: a Python file, or any executable
            return [ctx.job.python] if self._entrypoint(ctx).endswith(".py") else []
        argv = _torchrun_command(ctx.job.python) + [
            "--nnodes", str(len(ctx.hosts)),
            "--nproc-per-node", str(nproc),
            "--node-rank", str(rank),
            "--master-addr", ctx.master_addr,
            "--master-port", str(ctx.master_port or 29500),
        ]
        if runner.rdzv_backend == "c10d":
            argv[argv.index("--node-rank"):argv.index("--node-rank") + 2] = []
            argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{ctx.master_addr}:{ctx.master_port or 29500}"]
        return argv + ["--rdzv-id", ctx.run_id, "--log-dir", str(ctx.log_dir / "torchrun" / host.slug),
                       "--redirects", "3", "--tee", "3"]


def _torchrun_command(python: str) -> list[str]:
    beside = Path(python).parent / "torchrun"
    if beside.is_file() or shutil.which("torchrun") == str(beside):
        return [str(beside)]
    return [python, "-m", "torch.distributed.run"]


def _train_env(ctx: PlanContext, host: Host) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.update(ctx.host_env(host))
    return env


def _missing_data(args: argparse.Namespace, ctx: PlanContext) -> list[str]:
    """Each data prefix needs its .bin and .idx (weights in a blend are skipped)."""
    prefixes, _ = megatron_args.parse_blend(getattr(args, "data_path", None) or [])
    problems = []
    for item in prefixes:
        missing = [s for s in (".bin", ".idx") if not Path(item + s).is_file()]
        if missing:
            problems.append(
                f"data path {item} has no {' or '.join(missing)} file (train.data.data_path, in "
                f"{ctx.job.source.locate('train.data.data_path')}); create it with tools/datasets/preprocess_data.py"
            )
    return problems
