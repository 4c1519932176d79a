"""Recovery from killed ranks: the tiny GPT trained with `run.py action=test` and experiment.runner.max_restarts,
with N ranks killed (SIGKILL) at random times while it trains.

Prints, per failure, the time from the kill to the first iteration logged after the restart (what FlagScale's
diagnosis, stop, back-off and relaunch plus torchrun and Megatron-Core start-up cost) and the iterations redone;
then the goodput = time spent on iterations that were kept / wall time of the whole job (a run without failures
gives the baseline: its own start-up and checkpoints already cost some). Writes
outputs/benchmarks/recovery.json. Last line: `goodput <x>`.

    python examples/tiny_gpt/prepare_data.py
    python benchmarks/recovery.py [--kills 2] [--iters 750] [--save-interval 50] [--backoff 1] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import TINY_CONF, tiny_overrides, training_ranks  # noqa: E402


def launch(exp_dir: Path, data: Path, args: argparse.Namespace) -> subprocess.Popen:
    argv = [sys.executable, str(REPO / "run.py"), *TINY_CONF, "action=test",
            *tiny_overrides(data, exp_dir, train_iters=args.iters, eval_interval=100_000),
            "train.system.logging.log_interval=1", f"train.system.checkpoint.save_interval={args.save_interval}",
            f"++experiment.runner.max_restarts={args.kills}",
            f"++experiment.runner.restart_backoff={args.backoff}"]  # fmt: skip
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def runs(exp_dir: Path) -> list[list[dict]]:
    """Each launch's train events (one logs/<run id>/metrics.jsonl per launch), in launch order."""
    found = []
    for metrics in sorted(exp_dir.glob("logs/*/metrics.jsonl")):
        events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        found.append([e for e in events if e["event"] == "train"])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--iters", type=int, default=750)
    parser.add_argument("--save-interval", type=int, default=50)
    parser.add_argument("--backoff", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "tiny_gpt")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    # kill points: spread over the run, away from its ends
    points = sorted(rng.sample(range(args.iters // 8, args.iters * 7 // 8), args.kills))
    with tempfile.TemporaryDirectory(prefix="recovery_") as tmp:
        exp_dir = Path(tmp) / "exp"
        began = time.time()
        proc = launch(exp_dir, args.data, args)
        kills: list[dict] = []
        for point in points:
            while proc.poll() is None:
                current = runs(exp_dir)
                if len(current) == len(kills) + 1 and current[-1] and current[-1][-1]["iteration"] >= point:
                    break
                time.sleep(0.2)
            victims = training_ranks(exp_dir) if proc.poll() is None else []
            if not victims:
                raise SystemExit(f"the job ended before iteration {point} (exit {proc.returncode})")
            victim = rng.choice(victims)
            os.kill(victim, signal.SIGKILL)
            kills.append({"at_iteration": runs(exp_dir)[-1][-1]["iteration"], "time": time.time(), "pid": victim})
            print(f"killed rank pid {victim} at iteration {kills[-1]['at_iteration']}", flush=True)
        code = proc.wait()
        wall = time.time() - began
        launches = runs(exp_dir)
    if code != 0 or len(launches) != args.kills + 1:
        raise SystemExit(f"job exit {code}, {len(launches)} launches for {args.kills} kills")
    results = []
    for kill, after in zip(kills, launches[1:]):
        first = after[0]
        results.append({"killed_at": kill["at_iteration"], "resumed_at": first["iteration"] - 1,
                        "redone": kill["at_iteration"] - (first["iteration"] - 1),
                        "recovery_s": round(first["time"] - kill["time"], 1)})  # fmt: skip
        print(f"kill at {kill['at_iteration']}: resumed from {first['iteration'] - 1}, "
              f"{results[-1]['redone']} iterations redone, first new iteration {results[-1]['recovery_s']} s "
              "after the kill", flush=True)
    kept = {}  # iteration -> seconds it took, the last launch's time for an iteration done twice
    for launch_events in launches:
        for event in launch_events:
            kept[event["iteration"]] = event["step_time_ms"] / 1000
    goodput = sum(kept.values()) / wall
    median = round(statistics.median(r["recovery_s"] for r in results), 1) if results else None
    summary = {"kills": results, "wall_s": round(wall, 1), "iterations": args.iters, "goodput": round(goodput, 3),
               "median_recovery_s": median}  # fmt: skip
    out = REPO / "outputs" / "benchmarks" / "recovery.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wall {wall:.1f} s for {args.iters} iterations; median recovery {summary['median_recovery_s']} s; "
          f"wrote {out}")
    print(f"goodput {goodput:.3f}")


if __name__ == "__main__":
    main()
