"""Step times of the model families on this CPU: each full-size example YAML shrunk by tools/compat/shrink.py
(2 processes, hidden 64, seq 64, global batch 8) trained through `run.py action=test`.

Prints, per model, the median step time and tokens/s of the logged iterations after the first (warm-up),
the time from launch to the training loop's start (run.py, torchrun, model build, data indexes), and the peak
memory per rank; writes outputs/benchmarks/model_step_times.json. Run it on a quiet machine: every figure is
wall time. Last line: `slowest <model> <ms> ms/step`.

    python examples/tiny_gpt/prepare_data.py
    python benchmarks/model_step_times.py [--only deepseek_v3,mixtral] [--iters 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.compat import shrink  # noqa: E402


def measure(model: str, data: Path, exp_dir: Path) -> dict:
    argv = [sys.executable, str(REPO / "run.py"), "--config-path", str(REPO / "examples" / model / "conf"),
            "--config-name", "train", *shrink.overrides(model, data, exp_dir)]  # fmt: skip
    start = time.time()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{model}: run.py exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-1000:]}")
    (metrics_file,) = exp_dir.glob("logs/*/metrics.jsonl")
    events = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    train = [e for e in events if e.get("event") == "train"]
    steady = train[1:] or train
    return {
        "model": model, "task": shrink.TASKS[model],
        "step_ms": round(statistics.median(e["step_time_ms"] for e in steady), 1),
        "tokens_per_s": round(statistics.median(e["tokens_per_s"] for e in steady)),
        "startup_s": round(next(e["time"] for e in events if e.get("event") == "start") - start, 1),
        "peak_mem_mb": round(max(e.get("peak_mem_mb") or 0 for e in train)),
        "wall_s": round(time.time() - start, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="Comma-separated models (default: all).")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "tiny_gpt")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "benchmarks" / "model_step_times.json")
    args = parser.parse_args()
    models = args.only.split(",") if args.only else list(shrink.TASKS)
    results = []
    with tempfile.TemporaryDirectory(prefix="step_times_") as tmp:
        for model in models:
            result = measure(model, args.data.resolve(), Path(tmp) / model)
            results.append(result)
            print(f"{model:12s} {result['step_ms']:8.1f} ms/step  {result['tokens_per_s']:7d} tokens/s  "
                  f"loop starts {result['startup_s']} s after launch  peak {result['peak_mem_mb']} MB/rank  "
                  f"(wall {result['wall_s']} s)", flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    slowest = max(results, key=lambda r: r["step_ms"])
    print(f"slowest {slowest['model']} {slowest['step_ms']} ms/step")


if __name__ == "__main__":
    main()
