"""Train -> convert: a Megatron-Core checkpoint from FlagScale training (tensor- or pipeline-parallel)
becomes a Hugging Face Llama folder whose logits equal the Megatron model's, loaded with the training
program's own model builder, and whose greedy generation transformers runs.

`tiny_hf_model` (also used by the serve and inference tests) trains and converts once per session.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_CONF, run_py, tiny_overrides

pytestmark = pytest.mark.integration

CONVERTER = REPO / "tools" / "checkpoint" / "convert_megatron_to_hf.py"
PROMPT = "Once upon a time, there was a little"

# Runs in a fresh interpreter: Megatron's process group and parallel state stay out of pytest.
COMPARE = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from tools.checkpoint import megatron_loader
from transformers import AutoTokenizer, LlamaForCausalLM
ckpt, hf = sys.argv[2], sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(hf)
ids = tokenizer(sys.argv[4], return_tensors="pt").input_ids
loaded = megatron_loader.load(ckpt)
with torch.no_grad():
    megatron = loaded.model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None).float()
megatron_loader.shutdown()
model = LlamaForCausalLM.from_pretrained(hf).eval()
with torch.no_grad():
    logits = model(ids).logits.float()
    generated = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
print(json.dumps({"max_abs_diff": (megatron - logits).abs().max().item(), "scale": logits.abs().max().item(),
                  "argmax_equal": bool((megatron.argmax(-1) == logits.argmax(-1)).all()),
                  "generated": tokenizer.decode(generated)}))
"""


def train(data: Path, exp: Path, *overrides: str, iters: int = 20) -> Path:
    """A short tiny_gpt training run; returns its checkpoint folder."""
    proc = run_py(*TINY_CONF, *tiny_overrides(data, exp, train_iters=iters, eval_interval=iters, eval_iters=1),
                  "train.system.logging.log_interval=5", "train.model.optimizer.lr_warmup_iters=2", *overrides,
                  "action=test", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return exp / "checkpoints"


def convert(checkpoints: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERTER), "--load", str(checkpoints), "--output", str(output), *extra],
                          capture_output=True, text=True, timeout=600, cwd=REPO)


def tiny_hf_model(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """The tiny model trained with tensor parallelism 2 and converted, made once per test session."""
    root = tmp_path_factory.getbasetemp() / "tiny_hf_model"
    hf = root / "hf"
    if not (hf / "model.safetensors").is_file():
        checkpoints = train(data, root / "train", "train.system.tensor_model_parallel_size=2", iters=30)
        done = convert(checkpoints, hf)
        assert done.returncode == 0, done.stderr[-3000:]
    return hf


def _compare(checkpoints: Path, hf: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", COMPARE, str(REPO), str(checkpoints), str(hf), PROMPT],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("parallel", ["tensor_model_parallel_size=2",
                                      pytest.param("pipeline_model_parallel_size=2", marks=pytest.mark.slow)])
def test_converted_model_matches_megatron(tiny_data: Path, tmp_path: Path, parallel: str) -> None:
    checkpoints = train(tiny_data, tmp_path / "train", f"train.system.{parallel}")
    done = convert(checkpoints, tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "converted" in done.stdout and "iteration 20" in done.stdout
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= files
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["head_dim"] == 32
    result = _compare(checkpoints, tmp_path / "hf")
    assert result["max_abs_diff"] < 1e-4 * max(1.0, result["scale"]), result
    assert result["argmax_equal"], result
    assert result["generated"].strip(), result


def test_missing_checkpoint_and_tokenizer_are_clear_errors(tmp_path: Path) -> None:
    done = convert(tmp_path / "nothing", tmp_path / "hf")
    assert done.returncode == 1 and "holds no checkpoint" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "hf").exists()
