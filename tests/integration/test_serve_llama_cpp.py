"""The tiny model on llama.cpp's own server, end to end: trained, converted to Hugging Face, then to GGUF
(tools/checkpoint/convert_hf_to_gguf.py), served by `flagscale serve tiny_gpt serve_llama_cpp`; the `openai` client
gets a completion whose greedy text equals transformers' generate on the Hugging Face folder, a chat answer and a
stream that adds up to the same text; `stop` leaves nothing. Then upstream's serve schema with two deployments of
two engines (examples/tiny_gpt/conf/serve_two_engines.yaml): both answer, and stop ends both."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flagscale.serve.engines.llama_cpp import LlamaCpp
from tests.conftest import REPO, group_members
from tests.helpers.requires import need, requirement
from tests.integration.test_convert import tiny_hf_model
from tests.integration.test_serve_vllm import flagscale, free_port, hf_greedy, quiet_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]
_llama = requirement(LlamaCpp().missing(sys.executable) is None,
                     "llama.cpp's llama-server is not installed (bash install/install-requirements.sh --env all "
                     "--llama-cpp-backend cpu)")
PROMPT = "Once upon a time, there was a little"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> tuple[Path, Path]:
    hf = tiny_hf_model(tmp_path_factory, tiny_data)
    gguf = hf.parent / "gguf" / "model.gguf"
    if not gguf.is_file():
        done = subprocess.run([sys.executable, str(REPO / "tools/checkpoint/convert_hf_to_gguf.py"), "--input", str(hf),
                               "--output", str(gguf)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    return hf, gguf


def stopped_cleanly(exp: Path, env: dict[str, str]) -> None:
    record = json.loads((exp / "job.json").read_text())
    stop = flagscale("stop", str(exp), env=env, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not group_members([h["pgid"] for h in record["hosts"]]), "a server outlived stop"


def test_llama_cpp_serves_the_converted_tiny_model(models: tuple[Path, Path], tmp_path: Path) -> None:
    from openai import OpenAI

    hf, gguf = models
    port, exp = free_port(), tmp_path / "exp"
    env = quiet_env(exp)
    started = flagscale("serve", "tiny_gpt", "serve_llama_cpp", "--model-path", str(gguf), "--port", str(port),
                        f"experiment.exp_dir={exp}", env=env)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
    url = f"http://127.0.0.1:{port}/v1"
    try:
        assert f"serving tiny_gpt: {url}" in started.stdout
        script = Path(json.loads((exp / "job.json").read_text())["hosts"][0]["script"]).read_text()
        assert f"llama-server --model {gguf} --alias tiny_gpt" in script and "--parallel 4 --seed 0" in script
        client = OpenAI(base_url=url, api_key="none")
        text = client.completions.create(model="tiny_gpt", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
        assert text == hf_greedy(hf, PROMPT, 16), "llama.cpp's greedy text differs from transformers'"
        chat = client.chat.completions.create(model="tiny_gpt", max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": "Tell me a story"}])
        assert chat.choices[0].message.content
        stream = client.completions.create(model="tiny_gpt", prompt=PROMPT, max_tokens=16, temperature=0,
                                           stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == text
    finally:
        stopped_cleanly(exp, env)


def test_two_deployments_of_two_engines_start_and_stop_together(models: tuple[Path, Path], tmp_path: Path) -> None:
    from openai import OpenAI

    need(importlib.util.find_spec("vllm") is not None, "vLLM is not installed (install-requirements.sh --env all)")
    hf, gguf = models
    exp, vllm_port, llama_port = tmp_path / "exp", free_port(), free_port()
    env = quiet_env(exp)
    argv = [sys.executable, str(REPO / "run.py"), "--config-path", str(REPO / "examples/tiny_gpt/conf"),
            "--config-name", "serve_two_engines", "action=run", f"experiment.exp_dir={exp}",
            f"serve.0.engine_args.model={hf}", f"serve.0.engine_args.port={vllm_port}",
            f"serve.1.engine_args.model={gguf}", f"serve.1.engine_args.port={llama_port}"]
    started = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=400, env={**os.environ, **env})
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
        answers = {}
        for port in (vllm_port, llama_port):
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
            answers[port] = client.completions.create(model="tiny_gpt", prompt=PROMPT, max_tokens=8,
                                                      temperature=0).choices[0].text
        assert answers[vllm_port] == answers[llama_port] == hf_greedy(hf, PROMPT, 8)
        record = json.loads((exp / "job.json").read_text())
        assert record["info"]["engines"] == {"tiny_vllm": "vllm", "tiny_llama_cpp": "llama_cpp"}
        assert len(record["hosts"]) == 2
    finally:
        stopped_cleanly(exp, env)


def test_replicas_are_servers_of_their_own_that_stop_together(models: tuple[Path, Path], tmp_path: Path) -> None:
    from openai import OpenAI

    _, gguf = models
    port, exp = free_port(), tmp_path / "exp"
    env = quiet_env(exp)
    started = flagscale("serve", "tiny_gpt", "serve_llama_cpp", "--model-path", str(gguf), "--port", str(port),
                        "+serve.0.resources.num_replicas=2", f"experiment.exp_dir={exp}", env=env)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
        record = json.loads((exp / "job.json").read_text())
        assert record["info"]["urls"] == {"tiny_gpt-0": f"http://127.0.0.1:{port}/v1",
                                          "tiny_gpt-1": f"http://127.0.0.1:{port + 1}/v1"}
        texts = {OpenAI(base_url=url, api_key="none").completions.create(
            model="tiny_gpt", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
            for url in record["info"]["urls"].values()}
        assert len(texts) == 1 and texts.pop()
        assert len(record["hosts"]) == 2
    finally:
        stopped_cleanly(exp, env)
