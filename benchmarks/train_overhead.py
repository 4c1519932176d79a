"""Overhead of launching through run.py versus bare torchrun, same tiny model, same arguments.

Runs the tiny_gpt example once with `python run.py ... action=test` and once with
`torchrun --standalone` started directly with the training program and the very arguments
FlagScale planned, then compares the median tokens/s of the logged iterations (after warm-up)
read from each run's metrics.jsonl. Last line: `ratio <run.py tokens/s / bare tokens/s>`.

    python benchmarks/train_overhead.py [--iters 60] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flagscale.config.hostfile import LOCALHOST  # noqa: E402
from flagscale.config.loader import load_job_config  # noqa: E402
from flagscale.main import compose_config  # noqa: E402
from flagscale.runner.base import PlanContext, runner_for  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402


def median_tokens_per_s(metrics: Path, skip: int) -> float:
    events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rates = [e["tokens_per_s"] for e in events if e.get("event") == "train" and e["iteration"] > skip]
    if not rates:
        raise SystemExit(f"no train events after iteration {skip} in {metrics}")
    return statistics.median(rates)


def through_run_py(overrides: list[str], exp: Path) -> Path:
    cmd = [sys.executable, str(REPO / "run.py"), "--config-path", str(REPO / "examples/tiny_gpt/conf"),
           "--config-name", "train", "action=test", *overrides]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return next((exp / "logs").glob("*/metrics.jsonl"))


def bare_torchrun(overrides: list[str], exp: Path) -> Path:
    """torchrun started by hand with exactly the engine arguments FlagScale plans."""
    cfg, source = compose_config(REPO / "examples/tiny_gpt/conf", "train", [*overrides, "action=dryrun"])
    job = load_job_config(cfg, source)
    ctx = PlanContext(job=job, hosts=[LOCALHOST],
                      run_id="bare", master_port=None)
    argv = runner_for("train").plan(ctx).processes[0].argv
    entry = next(i for i, a in enumerate(argv) if a.endswith("train_gpt.py"))
    metrics_dir = exp / "bare"
    engine_args = argv[entry + 1:]
    engine_args[engine_args.index("--metrics-dir") + 1] = str(metrics_dir)
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
           argv[entry], *engine_args]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return metrics_dir / "metrics.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the two launches this many times")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="overhead_") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, str(REPO / "examples/tiny_gpt/prepare_data.py"), "--output-dir",
                        str(work / "data")], check=True, capture_output=True)
        ours, bare = [], []
        for repeat in range(args.repeats):
            for kind in ("run.py", "bare"):
                exp = work / f"{kind}_{repeat}"
                overrides = [*tiny_overrides(work / "data", exp, train_iters=args.iters, eval_interval=1000),
                             "train.system.checkpoint.save_interval=null", "train.system.checkpoint.save=null",
                             "train.system.checkpoint.load=null"]
                started = time.time()
                metrics = through_run_py(overrides, exp) if kind == "run.py" else bare_torchrun(overrides, exp)
                rate = median_tokens_per_s(metrics, skip=10)
                (ours if kind == "run.py" else bare).append(rate)
                print(f"{kind:7s} run {repeat}: {rate:,.0f} tokens/s (median), wall {time.time() - started:.1f}s",
                      flush=True)
    print(f"run.py: {statistics.median(ours):,.0f} tokens/s   bare torchrun: {statistics.median(bare):,.0f} tokens/s")
    print(f"ratio {statistics.median(ours) / statistics.median(bare):.3f}")


if __name__ == "__main__":
    main()
