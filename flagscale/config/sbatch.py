"""sbatch's option vocabulary (data: `flagscale/config/data/sbatch_options.json`, made from `sbatch --help` by
`tools/compat/extract_sbatch_options.py`) and the check of `experiment.runner.slurm.extra_sbatch_args` against it.

Options FlagScale sets itself (the node count, tasks per node, output files, ...) or that have a key of their own
under `runner.slurm` are refused in one line naming what to set instead."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

from flagscale.exceptions import ConfigError

DATA = Path(__file__).with_name("data") / "sbatch_options.json"
OWNED = {
    "nodes": "set experiment.runner.slurm.nodes (or experiment.runner.nnodes)",
    "ntasks-per-node": "set experiment.runner.slurm.ntasks_per_node",
    "ntasks": "FlagScale starts one task per node (torchrun starts the processes); set ntasks_per_node",
    "output": "FlagScale writes the job's output under <exp_dir>/logs/<run id>/",
    "error": "FlagScale writes the job's output under <exp_dir>/logs/<run id>/",
    "job-name": "set experiment.exp_name",
    "parsable": "FlagScale submits with --parsable itself",
    "wrap": "FlagScale writes the batch script",
    "array": "job arrays are not supported",
    "wait": "use action=test to follow a job to its end",
    "requeue": "FlagScale submits with --no-requeue: its supervisor restarts a failed job (runner.max_restarts)",
    "partition": "set experiment.runner.slurm.partition",
    "account": "set experiment.runner.slurm.account",
    "qos": "set experiment.runner.slurm.qos",
    "time": "set experiment.runner.slurm.time",
    "gpus-per-node": "set experiment.runner.slurm.gpus_per_node",
    "exclusive": "set experiment.runner.slurm.exclusive",
    "constraint": "set experiment.runner.slurm.constraint",
    "reservation": "set experiment.runner.slurm.reservation",
}
_HELP_LINE = re.compile(r"^\s+(?:-(?P<short>[A-Za-z]),?\s+)?--(?P<long>[a-z][a-z0-9-]*)(?P<value>\[?=)?")


def parse_help(text: str) -> dict[str, dict]:
    """sbatch's options from its `--help` text: {"long": {name: "none"|"required"|"optional"}, "short": {x: name}}."""
    long: dict[str, str] = {}
    short: dict[str, str] = {}
    for line in text.splitlines():
        found = _HELP_LINE.match(line)
        if not found:
            continue
        name, value = found.group("long"), found.group("value")
        kind = "optional" if value == "[=" else "required" if value == "=" else "none"
        if kind == "none" and re.match(rf"^\s+(?:-\w,?\s+)?--{re.escape(name)}\s+\S+\.\.\.", line):
            kind = "required"  # `-w, --nodelist=hosts...` is printed with '=', `-B --extra-node-info=S` too
        long.setdefault(name, kind)
        if found.group("short"):
            short[found.group("short")] = name
    return {"long": dict(sorted(long.items())), "short": dict(sorted(short.items()))}


@cache
def options() -> Mapping[str, dict]:
    return json.loads(DATA.read_text())


def check_extra_args(args: Sequence[str], path: str) -> None:
    """Each element is an sbatch option (`--name[=value]`, `-x`), or the value of the option before it."""
    table = options()
    expect_value = False
    for arg in args:
        if expect_value and not arg.startswith("-"):
            expect_value = False
            continue
        expect_value = False
        if arg.startswith("--"):
            name, eq, _ = arg[2:].partition("=")
            kind = table["long"].get(name)
        elif re.fullmatch(r"-[A-Za-z]", arg):
            name, eq = table["short"].get(arg[1], ""), ""
            kind = table["long"].get(name)
        else:
            raise ConfigError(f"{path}: '{arg}' is not an sbatch option (options look like --mem=8G or -x node3)")
        if kind is None:
            raise ConfigError(f"{path}: '{arg}' is not an option sbatch knows (see sbatch --help)")
        if name in OWNED:
            raise ConfigError(f"{path}: '{arg}': {OWNED[name]}")
        expect_value = kind == "required" and not eq
