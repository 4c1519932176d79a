"""The full-size training YAMLs in upstream FlagScale's shape (aquila 7b, deepseek_v3 16b_a3b, mixtral 8x7b,
qwen3 30b_a3b, llama3 8b) train on this CPU when shrunk by Hydra overrides alone (tools/compat/shrink.py): no
file is edited, only sizes, parallel layout, data and tokenizer paths change on the command line, as a user
would try a config before taking it to GPUs. Precision, router, MLA, MTP, schedules and tokenizer types stay
the YAML's own. Loss falls; MoE and MTP losses reach metrics.jsonl; the last checkpoint is written.
(`python tools/compat/train_upstream.py --mirror GITDIR` does the same with upstream's own files.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_py
from tools.compat import shrink

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("model", sorted(shrink.TASKS))
def test_full_size_example_trains_when_shrunk_by_overrides(model: str, tiny_data: Path, tmp_path: Path) -> None:
    proc = run_py("--config-path", f"examples/{model}/conf", "--config-name", "train",
                  *shrink.overrides(model, tiny_data, tmp_path), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    (metrics_file,) = (tmp_path / "logs").glob("*/metrics.jsonl")
    train = [e for e in map(json.loads, metrics_file.read_text().splitlines()) if e["event"] == "train"]
    assert train[-1]["iteration"] == shrink.ITERS
    assert train[-1]["loss"] < train[0]["loss"] - 1.0, [e["loss"] for e in train]
    assert shrink.EXPECTED_FIELDS[model] <= set(train[-1]), sorted(train[-1])
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == str(shrink.ITERS)
