"""vLLM versus llama.cpp on this machine: the same tiny model, the same request load, through `flagscale serve`.

Trains the tiny GPT briefly (or takes --hf/--gguf), converts it to Hugging Face and to GGUF, then for each engine:
cold start (from `flagscale serve` to the first answered request: FlagScale's launch plus the engine's start-up),
then the load of flagscale/serve/loadgen.py (streamed greedy completions, `--requests` at `--concurrency`):
requests/s, output tokens/s, TTFT, inter-token latency, TPOT and end-to-end latency at p50/p95. Writes
<out>/serve_engines.json. Last line: `tokens/s llama_cpp/vllm <ratio>`.

    python benchmarks/serve_engines.py [--requests 64] [--concurrency 4] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flagscale.serve.loadgen import LoadSpec, run_load  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402

ENGINES = {"vllm": "serve", "llama_cpp": "serve_llama_cpp"}
ROWS = ("requests_per_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "itl_p95_ms",
        "tpot_p50_ms", "e2el_p50_ms", "e2el_p95_ms")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def models(scratch: Path) -> tuple[Path, Path]:
    """Train the tiny GPT 60 iterations, convert it to Hugging Face and to GGUF."""
    data, exp = scratch / "data", scratch / "train"
    subprocess.run([sys.executable, str(REPO / "examples/tiny_gpt/prepare_data.py"), "--output-dir", str(data)],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, str(REPO / "run.py"), "--config-path", str(REPO / "examples/tiny_gpt/conf"),
                    "--config-name", "train", "action=test",
                    *tiny_overrides(data, exp, train_iters=60, eval_interval=60, eval_iters=1),
                    "train.system.checkpoint.save_interval=60"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    hf, gguf = scratch / "hf", scratch / "gguf" / "model.gguf"
    subprocess.run([sys.executable, str(REPO / "tools/checkpoint/convert_megatron_to_hf.py"), "--load",
                    str(exp / "checkpoints"), "--output", str(hf)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, str(REPO / "tools/checkpoint/convert_hf_to_gguf.py"), "--input", str(hf),
                    "--output", str(gguf)], check=True, stdout=subprocess.DEVNULL)
    return hf, gguf


def answer(url: str) -> bool:
    body = json.dumps({"model": "tiny_gpt", "prompt": "Once", "max_tokens": 1, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status == 200
    except OSError:
        return False


def measure(engine: str, model: Path, scratch: Path, spec: dict) -> dict:
    port, exp = free_port(), scratch / f"serve-{engine}"
    (exp / "tmp").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_CACHE_ROOT": str(exp / "cache"), "TMPDIR": str(exp / "tmp"), "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    cli = [sys.executable, "-m", "flagscale.cli"]
    began = time.perf_counter()
    subprocess.run([*cli, "serve", "tiny_gpt", ENGINES[engine], "--model-path", str(model), "--port", str(port),
                    f"experiment.exp_dir={exp}"], check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    while not answer(url):
        time.sleep(0.05)
    cold = time.perf_counter() - began
    try:
        report = run_load(LoadSpec(url=url, model="tiny_gpt", **spec))
    finally:
        subprocess.run([*cli, "stop", str(exp)], cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    figures = report.figures()
    if figures["failed"]:
        raise SystemExit(f"{engine}: {figures['failed']} request(s) failed: {figures.get('first_error')}")
    return {"cold_start_s": round(cold, 2), **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf", type=Path, help="a Hugging Face folder of the tiny model (default: train one)")
    parser.add_argument("--gguf", type=Path, help="its GGUF file (default: convert --hf)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="serve-engines-"))
    hf, gguf = (args.hf, args.gguf) if args.hf and args.gguf else models(scratch)
    spec = {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens}
    results = {engine: measure(engine, hf if engine == "vllm" else gguf, scratch, spec) for engine in ENGINES}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_engines.json").write_text(json.dumps({"load": spec, "results": results}, indent=2) + "\n")
    print(f"{args.requests} requests, {args.concurrency} at a time, {args.max_tokens} tokens each (greedy)")
    print("| figure | " + " | ".join(ENGINES) + " |\n|---|" + "---|" * len(ENGINES))
    for row in ("cold_start_s", *ROWS):
        print(f"| {row} | " + " | ".join(str(results[e][row]) for e in ENGINES) + " |")
    print(f"written: {args.out / 'serve_engines.json'}")
    ratio = results["llama_cpp"]["output_tokens_per_s"] / results["vllm"]["output_tokens_per_s"]
    print(f"tokens/s llama_cpp/vllm {ratio:.3f}")


if __name__ == "__main__":
    main()
