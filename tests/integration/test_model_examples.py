"""The model examples (deepseek_v3, mixtral, qwen3, llama3) train on this CPU as the README says:
`python run.py --config-path examples/<model>/conf --config-name train_tiny action=test`, with the
tiny corpus from the tiny_gpt example. Loss falls; MoE router and MTP losses reach metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_py

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPECTED_FIELDS = {
    "deepseek_v3": {"moe_seq_load_balancing_loss", "mtp_loss"},
    "mixtral": {"moe_load_balancing_loss"},
    "qwen3": {"moe_load_balancing_loss"},
    "llama3": set(),
}


# deepseek_v3 trains every time (MLA, shared experts, sigmoid router, MTP: the most the tiny examples carry);
# the other tiny examples' configs are checked field by field (tests/unit/test_example_model_configs.py) and
# their full-size YAMLs train shrunk (test_full_size_examples_shrunk.py).
@pytest.mark.parametrize("model", ["deepseek_v3"])
def test_tiny_model_example_trains(model: str, tiny_data: Path, tmp_path: Path) -> None:
    proc = run_py("--config-path", f"examples/{model}/conf", "--config-name", "train_tiny", "action=test",
                  f"experiment.exp_dir={tmp_path}",
                  f"train.data.data_path=[0.7,{tiny_data}/stories_text_document,0.3,{tiny_data}/facts_text_document]",
                  f"train.data.tokenizer.tokenizer_model={tiny_data}/tokenizer", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    (metrics_file,) = (tmp_path / "logs").glob("*/metrics.jsonl")
    train = [e for e in map(json.loads, metrics_file.read_text().splitlines()) if e["event"] == "train"]
    assert train[-1]["iteration"] == 40
    assert train[-1]["loss"] < train[0]["loss"] - 1.0, [e["loss"] for e in train]
    assert EXPECTED_FIELDS[model] <= set(train[-1]), sorted(train[-1])
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "40"
