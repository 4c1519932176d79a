"""What `flagscale serve` costs over the bare vLLM server: the same model, the same server arguments,
the same batch of concurrent requests (loopback only, a bounded count), one server at a time.

    python benchmarks/serve_overhead.py --model outputs/tiny_gpt/hf [--requests 32] [--concurrency 16]

Each server starts alone (its start-up is timed alone); then both stay up and measured batches
alternate between them, so the machine's other load falls on both alike. Prints, for each: seconds
from the command to the first answered request, requests/s and generated tokens/s; the last line is
`ratio <ours/bare tokens per s>`. The bare server gets exactly the argv and environment FlagScale
rendered into its job script.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time, there was a little"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def complete(base: str, max_tokens: int, timeout: float = 120) -> int:
    """One greedy completion of exactly max_tokens tokens; returns the tokens generated."""
    body = json.dumps({"model": "tiny_gpt", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return int(json.loads(response.read())["usage"]["completion_tokens"])


def first_answer(base: str, started: float, deadline_s: float) -> float:
    """Seconds from `started` until a completion is answered (polling; bounded by deadline_s)."""
    while time.monotonic() - started < deadline_s:
        try:
            complete(base, 1, timeout=10)
            return time.monotonic() - started
        except OSError:
            time.sleep(0.25)
    raise SystemExit(f"no answer from {base} within {deadline_s:.0f}s")


@dataclass(slots=True)
class Server:
    name: str
    base: str
    first_answer_s: float
    seconds: float = 0.0
    requests: int = 0
    tokens: int = 0

    def measure(self, requests: int, concurrency: int, max_tokens: int) -> None:
        """Add one batch of `requests` completions, `concurrency` at a time."""
        tick = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            self.tokens += sum(pool.map(lambda _: complete(self.base, max_tokens), range(requests)))
        self.seconds += time.monotonic() - tick
        self.requests += requests


def warm_page_cache() -> None:
    """Import the server once, untimed, so neither start-up pays for reading vLLM from disk."""
    subprocess.run([sys.executable, "-c", "import vllm.entrypoints.openai.api_server"], cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def start_ours(model: Path, exp: Path) -> Server:
    """`flagscale serve` (it returns once the server answers /health and /v1/models)."""
    port = free_port()
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "flagscale.cli", "serve", "tiny_gpt", "--model-path", str(model),
                    "--port", str(port), f"experiment.exp_dir={exp}"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    return Server("flagscale serve", base, first_answer(base, started, 600))


def rendered_command(model: Path, exp: Path) -> tuple[list[str], dict[str, str]]:
    """The server argv and exported env that `flagscale serve` renders (its dryrun: the same plan)."""
    subprocess.run([sys.executable, "-m", "flagscale.cli", "serve", "tiny_gpt", "--model-path", str(model),
                    "--port", "1", "--dryrun", f"experiment.exp_dir={exp}"], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    (script,) = (exp / "logs" / "scripts").glob("*.sh")
    lines = script.read_text().splitlines()
    exports = [shlex.split(line.removeprefix("export "))[0] for line in lines if line.startswith("export ")]
    command = next(line for line in lines if "vllm.entrypoints.openai.api_server" in line)
    return shlex.split(command), dict(item.split("=", 1) for item in exports)


def start_bare(argv: list[str], env: dict[str, str]) -> tuple[Server, subprocess.Popen]:
    """The same argv and environment on a new port, started directly."""
    port = free_port()
    at = argv.index("--port")
    argv = [*argv[:at + 1], str(port), *argv[at + 2:]]
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    return Server("bare api_server", base, first_answer(base, started, 600)), proc


def end_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def compare(args: argparse.Namespace, tmp: Path) -> list[Server]:
    """Start each alone (start-up timed alone; the bare one first, so a warmer machine favours it),
    then alternate measured batches, so a change in the machine's other load falls on both alike."""
    argv, env = rendered_command(args.model, tmp / "dryrun")
    warm_page_cache()
    bare, proc = start_bare(argv, env)
    ours = None
    try:
        ours = start_ours(args.model, tmp / "ours")
        for server in (ours, bare):
            complete(server.base, args.max_tokens)  # warm-up, not counted
        for round_ in range(args.rounds):
            for server in (ours, bare) if round_ % 2 == 0 else (bare, ours):
                server.measure(args.requests, args.concurrency, args.max_tokens)
    finally:
        end_group(proc)
        if ours is not None or (tmp / "ours" / "job.json").is_file():
            subprocess.run([sys.executable, "-m", "flagscale.cli", "stop", str(tmp / "ours")], cwd=REPO,
                           stdout=subprocess.DEVNULL)
    return [ours, bare]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="A Hugging Face folder (e.g. outputs/tiny_gpt/hf).")
    parser.add_argument("--requests", type=int, default=32, help="Completions per batch (at most 256).")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="Measured batches per server, alternating (at most 10).")
    args = parser.parse_args()
    args.requests, args.rounds = min(args.requests, 256), min(args.rounds, 10)
    with tempfile.TemporaryDirectory(prefix="fs-serve-bench-") as tmp:
        ours, bare = compare(args, Path(tmp))
    print(f"model {args.model}: {args.rounds} x {args.requests} requests per server, {args.concurrency} concurrent, "
          f"{args.max_tokens} tokens each")
    for server in (ours, bare):
        print(f"{server.name:>16}: first answer {server.first_answer_s:6.1f}s after the command, "
              f"{server.requests / server.seconds:6.2f} requests/s, {server.tokens / server.seconds:8.1f} tokens/s")
    print(f"ratio {(ours.tokens / ours.seconds) / (bare.tokens / bare.seconds):.3f}")


if __name__ == "__main__":
    main()
