"""Train runner: plans torchrun on every host running the Megatron-Core training program."""

from __future__ import annotations

import argparse
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagscale.config import hetero
from flagscale.config.flatten import Leaves, flatten_leaves, to_argv
from flagscale.config.hostfile import Host
from flagscale.config.schema import unknown_key_message
from flagscale.config.vocabulary import Argument, category, coerce, megatron_arguments
from flagscale.exceptions import ConfigError
from flagscale.runner.base import REPO_ROOT, PlanContext, TaskRunner
from flagscale.spec.plan import Plan, ProcessSpec
from flagscale.train import arguments as megatron_args

DEFAULT_ENTRYPOINT = "flagscale/train/train_gpt.py"
# Arguments FlagScale fills in itself; setting them in YAML would fight the runner.
RESERVED = {"metrics_dir"}


# Directories upstream FlagScale derives from exp_dir when the YAML leaves them unset.
DIR_DEFAULTS = {"save": "checkpoints", "load": "checkpoints", "tensorboard_dir": "tensorboard",
                "wandb_save_dir": "wandb"}
# torchrun options the runner sets; a `runner` pass-through of the same name replaces the runner's value.
_REPLACEABLE = ("redirects", "tee", "rdzv_endpoint")


@dataclass(slots=True, kw_only=True)
class TrainArguments:
    """The task YAML as the training program's arguments, sorted by what this project does with them."""

    leaves: Leaves
    """Argument -> (where it was set, value), in command-line order; the last setting of a name wins."""
    overridden: list[tuple[str, str, str]] = field(default_factory=list)
    cuda_only: list[str] = field(default_factory=list)
    """Set CUDA performance knobs: passed on, dropped by the program on a host without CUDA."""
    not_applied: list[str] = field(default_factory=list)
    """Those of them this program does not implement: not applied on CUDA either (performance only)."""
    inert: list[str] = field(default_factory=list)
    """Set options with no effect here (reporting only)."""


def train_arguments(ctx: PlanContext) -> TrainArguments:
    """Check every train.* leaf against Megatron-LM's vocabulary and this program's; one line per refusal."""
    task = ctx.job.task
    if not isinstance(task, dict):
        raise ConfigError("the 'train' section must be a mapping of groups (system, model, data)")
    overridden: list[tuple[str, str, str]] = []
    leaves = flatten_leaves(task, "train", overridden)
    result = TrainArguments(leaves={}, overridden=overridden)
    vocabulary, implemented = megatron_arguments(), megatron_args.implemented_keys()
    refused: list[tuple[str, str, Any]] = []
    for name, (path, value) in leaves.items():
        where = ctx.job.source.locate(path)
        if name in RESERVED:
            raise ConfigError(f"'{path}' is set by FlagScale itself; remove it (in {where})")
        if name not in vocabulary:
            raise ConfigError(f"{unknown_key_message(path, name, list(vocabulary))} (in {where}); "
                              "train.* keys are Megatron-LM argument names")
        checked = coerce(vocabulary[name], value, f"{path} (in {where})")
        value = checked if isinstance(value, str) or checked is None else value  # numbers stay as written
        result.leaves[name] = (path, value)
        if _is_default(vocabulary[name], value):
            continue
        kind = category(name, implemented)
        if kind == "not_implemented":
            refused.append((name, path, value))
        if kind == "used":
            _check_implemented_choice(name, path, value, where)
        if kind == "inert":
            result.inert.append(name)
        if category(name, frozenset()) == "cuda_only":
            result.cuda_only.append(name)
            if kind != "used":
                result.not_applied.append(name)
    if leaves.get("enable_hetero", ("", False))[1]:  # validated as a layout (flagscale/config/hetero.py)
        refused = [r for r in refused if r[0] not in hetero.KEYS]
    if refused:
        raise ConfigError(_refusal(refused, ctx))
    _add_dir_defaults(result.leaves, ctx)
    return result


def _is_default(argument: Argument, value: Any) -> bool:
    """Unset, or set to what Megatron-LM would use anyway (a flag left off)."""
    if argument.kind in ("flag", "negated_flag"):
        return not value
    return value is None or value == argument.default


def _check_implemented_choice(name: str, path: str, value: Any, where: str) -> None:
    choices = megatron_args.implemented_choices(name)
    values = value if isinstance(value, list) else [value]
    bad = [v for v in values if v is not None and v not in (choices or values)]
    if bad:
        raise ConfigError(f"{path}={bad[0]}: not implemented by this project's training program yet (implemented: "
                          f"{', '.join(map(str, choices or ()))}) (in {where})")


def _refusal(refused: list[tuple[str, str, Any]], ctx: PlanContext) -> str:
    name, path, value = refused[0]
    others = [n for n, _, _ in refused[1:]]
    more = f"; also not implemented yet: {', '.join(others[:12])}" + (" ..." if len(others) > 12 else "")
    return (f"{path}={value}: Megatron-LM argument '{name}' is not implemented by this project's training program "
            f"yet (in {ctx.job.source.locate(path)}){more if others else ''}")


def _add_dir_defaults(leaves: Leaves, ctx: PlanContext) -> None:
    """save/load/tensorboard_dir/wandb_save_dir under exp_dir when unset; given paths made absolute."""
    for name, folder in DIR_DEFAULTS.items():
        path, value = leaves.get(name, (f"experiment.exp_dir (default {name})", None))
        if value is None:
            leaves[name] = (path, str(ctx.exp_dir / folder))
        elif isinstance(value, str):
            leaves[name] = (path, str(Path(value).expanduser().resolve()))


class TrainRunner(TaskRunner):
    task_type = "train"

    def validate(self, ctx: PlanContext) -> None:
        arguments = train_arguments(ctx)
        self._check_entrypoint(ctx)
        for name, earlier, winner in arguments.overridden:
            ctx.notes.append(f"'{name}' is set twice: {earlier} ({ctx.job.source.locate(earlier)}) and {winner} "
                             f"({ctx.job.source.locate(winner)}); the last one wins, as in Megatron-LM's argparse")
        if arguments.cuda_only:
            ctx.notes.append("CUDA-only performance options (no effect on the model): a host without CUDA drops "
                             "them: " + ", ".join(arguments.cuda_only))
        if arguments.not_applied:
            ctx.notes.append("of those, this training program does not apply on CUDA either: "
                             + ", ".join(arguments.not_applied))
        if arguments.inert:
            ctx.notes.append("options with no effect in this project's training program (reporting only): "
                             + ", ".join(arguments.inert))
        runner = ctx.job.experiment.runner
        if (runner.max_restarts or runner.hang_timeout) and ctx.job.action in ("run", "dryrun"):
            ctx.notes.append(f"experiment.runner.max_restarts={runner.max_restarts}, hang_timeout="
                             f"{runner.hang_timeout}: under action=run a detached supervisor watches the job and "
                             "restarts it from its last checkpoint (action=stop stops both)")
        args = self._parse(ctx, arguments)
        world = sum(ctx.nproc(h) for h in ctx.hosts)
        if self._hetero(ctx, arguments, world):
            return
        try:
            megatron_args.checked(args, world)
        except ConfigError as err:
            raise ConfigError(_locate_problems(str(err), arguments.leaves, ctx)) from None
        missing = [] if ctx.job.experiment.runner.no_shared_fs else _missing_data(args, ctx)
        if missing and ctx.job.action != "dryrun":
            raise ConfigError(missing[0])
        ctx.notes.extend(missing)

    def _hetero(self, ctx: PlanContext, arguments: TrainArguments, world: int) -> bool:
        """A heterogeneous layout (train.system.hetero): checked, its hosts put in mesh order and its rank map noted;
        True if there is one. Only a dryrun goes on: the training program does not build the meshes yet."""
        leaves = arguments.leaves

        def where(name: str) -> str:
            path = leaves.get(name, (f"train.system.hetero.{name}", None))[0]
            return f"{path} (in {ctx.job.source.locate(path)})"

        layout = hetero.hetero_layout({name: value for name, (_, value) in leaves.items()}, where)
        if layout is None:
            return False
        problems = hetero.model_problems(layout, {name: value for name, (_, value) in leaves.items()}, where)
        if problems:
            raise ConfigError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        ctx.hosts = hetero.assign_hosts(layout, ctx.hosts, ctx.nproc)
        if world != layout.world_size:
            raise ConfigError(f"the meshes of {where('hetero_process_meshes')} need {layout.world_size} processes, the "
                              f"hosts run {world}: set experiment.runner.nproc_per_node={layout.world_size}"
                              if all(h.is_local for h in ctx.hosts) else
                              f"the meshes need {layout.world_size} processes, the hosts run {world}")
        ctx.notes.append(f"heterogeneous layout: {len(layout.meshes)} meshes, {layout.num_stages} pipeline stages, "
                         f"layers {list(layout.layer_split)}; " + "; ".join(m.describe() for m in layout.meshes))
        ctx.notes.extend(hetero.rank_table(layout, ctx.hosts, ctx.nproc))
        if ctx.job.action != "dryrun":
            raise ConfigError(f"{where('enable_hetero')}: the layout is valid (action=dryrun shows its rank map), but "
                              "this project's training program does not build heterogeneous meshes yet; remove "
                              "train.system.hetero to train with one tensor/pipeline layout")
        return True

    def plan(self, ctx: PlanContext) -> Plan:
        engine_argv = to_argv(train_arguments(ctx).leaves) + ["--metrics-dir", str(ctx.log_dir)]
        nprocs = [ctx.nproc(h) for h in ctx.hosts]
        runner = ctx.job.experiment.runner
        notes = ctx.notes + [
            f"host {h.name}: nproc_per_node capped to {n} (slots/visible devices)"
            for h, n in zip(ctx.hosts, nprocs)
            if runner.nproc_per_node and n < runner.nproc_per_node
        ]
        hetero_on = bool(train_arguments(ctx).leaves.get("enable_hetero", ("", False))[1])
        processes = [
            ProcessSpec(
                host=host,
                node_rank=rank,
                argv=self._torchrun(ctx, host, rank, nproc) + [self._entrypoint(ctx)] + engine_argv
                + (["--hetero-current-device-type", host.type] if hetero_on and host.type else []),
                env=_train_env(ctx, host),
                cwd=os.getcwd(),
                log_path=str(ctx.log_dir / f"{host.slug}.log"),
                before_start=ctx.job.experiment.cmds.lines("before_start"),
                container=runner.docker,
            )
            for rank, (host, nproc) in enumerate(zip(ctx.hosts, nprocs))
        ]
        return Plan(task_type="train", exp_dir=str(ctx.exp_dir), run_id=ctx.run_id, log_dir=str(ctx.log_dir),
                    processes=processes, after_stop=ctx.job.experiment.cmds.lines("after_stop"),
                    master_addr=ctx.master_addr, master_port=ctx.master_port, info=self.info(ctx), notes=notes)

    def info(self, ctx: PlanContext) -> dict[str, Any]:
        leaves = train_arguments(ctx).leaves
        return {
            "metrics_file": str(ctx.log_dir / "metrics.jsonl"),
            "train_iters": leaves.get("train_iters", (None, None))[1],
            "world_size": sum(ctx.nproc(h) for h in ctx.hosts),
        }

    def _parse(self, ctx: PlanContext, arguments: TrainArguments) -> argparse.Namespace:
        parser = megatron_args.build_parser()
        parser.exit_on_error = False
        try:
            return parser.parse_args(to_argv(arguments.leaves))
        except argparse.ArgumentError as err:
            raise ConfigError(f"the train section does not parse as the training program's arguments: {err} "
                              "(see python flagscale/train/train_gpt.py --help)") from None

    def _entrypoint(self, ctx: PlanContext) -> str:
        entry = Path(ctx.job.experiment.task.entrypoint or DEFAULT_ENTRYPOINT)
        return str(entry if entry.is_absolute() else REPO_ROOT / entry)

    def _check_entrypoint(self, ctx: PlanContext) -> None:
        entry = Path(self._entrypoint(ctx))
        if ctx.hosts[0].is_local and ctx.job.experiment.runner.docker is None and not entry.exists():
            raise ConfigError(f"experiment.task.entrypoint {ctx.job.experiment.task.entrypoint} does not exist; this "
                              f"project's training program is {DEFAULT_ENTRYPOINT} (GPT-style models on Megatron-Core) "
                              f"(in {ctx.job.source.locate('experiment.task.entrypoint')})")

    def _torchrun(self, ctx: PlanContext, host: Host, rank: int, nproc: int) -> list[str]:
        runner = ctx.job.experiment.runner
        if runner.backend == "direct":  # the entrypoint once per host: a Python file, or any executable
            return [ctx.job.python] if self._entrypoint(ctx).endswith(".py") else []
        nnodes, master = (1, "localhost") if runner.per_node_task else (len(ctx.hosts), ctx.master_addr)
        rank = 0 if runner.per_node_task else rank
        port = ctx.rendezvous_port
        endpoint = f"{master}:{port}"
        options: dict[str, Any] = {"nnodes": nnodes, "nproc_per_node": nproc, "node_rank": rank,
                                   "master_addr": master, "master_port": port}
        if runner.rdzv_backend == "c10d":
            del options["node_rank"], options["master_addr"], options["master_port"]
            options.update(rdzv_backend="c10d", rdzv_endpoint=endpoint)
        options.update(rdzv_id=runner.rdzv_id or ctx.run_id, log_dir=str(ctx.log_dir / "torchrun" / host.slug),
                       redirects=3, tee=3)
        options.update({k: v for k, v in runner.torchrun_args.items() if k in _REPLACEABLE})
        passed = {k: ("", v) for k, v in runner.torchrun_args.items() if k not in _REPLACEABLE}
        return _torchrun_command(ctx.job.python) + to_argv({k: ("", v) for k, v in options.items()}) \
            + to_argv(passed)


def _locate_problems(message: str, leaves: Leaves, ctx: PlanContext) -> str:
    """Each reported problem gets the key, value and file:line of the first argument it names."""
    lines = message.splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        named = next((n for n in sorted(leaves, key=len, reverse=True) if re.search(rf"\b{n}\b", line)), None)
        if named is None:
            out.append(line)
            continue
        path, value = leaves[named]
        out.append(f"{line} ({path}={value}, in {ctx.job.source.locate(path)})")
    return "\n".join(out)


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
    """Each data prefix needs its .bin and .idx (weights in a blend are skipped); tokenizer files must exist."""
    prefixes, _ = megatron_args.parse_blend(getattr(args, "data_path", None) or [])
    problems = []
    for item in prefixes:
        missing = [s for s in (".bin", ".idx") if not Path(item + s).is_file()]
        if missing:
            problems.append(
                f"data path {item} has no {' or '.join(missing)} file (train.data.data_path, in "
                f"{ctx.job.source.locate('train.data.data_path')}); create it with tools/datasets/preprocess_data.py"
            )
    leaves = train_arguments(ctx).leaves
    for name in ("tokenizer_model", "tokenizer_path", "vocab_file", "merge_file", "special_tokens_file"):
        path, value = leaves.get(name, ("", None))
        if value and not Path(str(value)).expanduser().exists():
            problems.append(f"{path} {value} does not exist (in {ctx.job.source.locate(path)})")
    return problems
