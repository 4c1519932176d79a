"""Checkpoint conversion tests' shared tools: programs run in a fresh interpreter (Megatron's process group and
parallel state stay out of pytest), the converter's refusals checked from saved arguments alone, and copies of a
checkpoint's arguments (no weights) with some changed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

REFUSALS = r"""
import copy, importlib, json, sys
import torch
sys.path.insert(0, sys.argv[1])
from tools.checkpoint.errors import ConversionError
module, name = sys.argv[3].split(":")
check = getattr(importlib.import_module(module), name)
saved = torch.load(sys.argv[2], weights_only=False)["args"]
results = {}
for case, changes in json.loads(sys.argv[4]).items():
    args = copy.deepcopy(saved)
    for key, value in changes.items():
        assert hasattr(args, key), key
        setattr(args, key, value)
    try:
        check(args)
        results[case] = None
    except ConversionError as err:
        results[case] = str(err)
print(json.dumps(results))
"""


def python_json(*args: str) -> dict:
    """Run a program in a fresh interpreter; its last stdout line, as JSON."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def refusals(common_pt: Path, check: str, cases: dict[str, dict]) -> dict[str, str | None]:
    """For each case (argument changes to the saved training arguments), the converter's refusal message or None
    when `check` ('module:function') accepts it; every case in one interpreter."""
    return python_json("-c", REFUSALS, str(REPO), str(common_pt), check, json.dumps(cases))


def with_args(checkpoints: Path, iteration: str, dest: Path, **changes: object) -> Path:
    """A copy of the checkpoint's tracker and saved arguments only (no weights), with `changes` made."""
    import torch

    source, copy = checkpoints / iteration, dest / iteration
    copy.mkdir(parents=True)
    shutil.copy2(checkpoints / "latest_checkpointed_iteration.txt", dest)
    for name in ("common.pt", "metadata.json"):
        shutil.copy2(source / name, copy / name)
    common = torch.load(copy / "common.pt", weights_only=False)
    for key, value in changes.items():
        setattr(common["args"], key, value)
    torch.save(common, copy / "common.pt")
    return dest
