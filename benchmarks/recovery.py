"""Recovery from killed ranks: the tiny GPT started with `run.py action=run` and experiment.runner.max_restarts (its
detached supervisor restarts it), with N ranks killed (SIGKILL) at random times while it trains.

Prints, per failure, the time from the kill to the first iteration logged after the restart, split into what
FlagScale controls (notice: poll + diagnosis; relaunch: stop, back-off, plan, start) and what the engine costs
(start-up: torchrun, imports, initialize, build + checkpoint load; the first iteration), and the iterations redone;
then the goodput the supervisor reports (`flagscale status`) = time spent on iterations that were kept / wall time
from the launch to the end (a run without failures, --kills 0, gives the baseline: its own start-up and checkpoints
already cost some). Writes
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

from flagscale.supervisor.restart import goodput, read_events  # noqa: E402
from tests.conftest import TINY_CONF, tiny_overrides, training_ranks  # noqa: E402


def launch(exp_dir: Path, data: Path, args: argparse.Namespace) -> subprocess.Popen:
    argv = [sys.executable, str(REPO / "run.py"), *TINY_CONF, "action=run",
            *tiny_overrides(data, exp_dir, train_iters=args.iters, eval_interval=100_000),
            "train.system.logging.log_interval=1", f"train.system.checkpoint.save_interval={args.save_interval}",
            f"++experiment.runner.max_restarts={max(args.kills, 1)}",  # a supervisor even for the baseline
            f"++experiment.runner.restart_backoff={args.backoff}"]  # fmt: skip
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def events(exp_dir: Path) -> list[dict]:
    """The supervisor's events (the detached supervisor that action=run leaves restarts the job)."""
    try:
        record = json.loads((exp_dir / "job.json").read_text())
    except (OSError, ValueError):
        return []
    return read_events((record["info"].get("supervisor") or {}).get("events", ""))


def ended(exp_dir: Path) -> bool:
    return any(e["event"] in ("ended", "gave_up") for e in events(exp_dir))


def runs(exp_dir: Path, kind: str = "train") -> list[list[dict]]:
    """Each launch's `kind` events (one logs/<run id>/metrics.jsonl per launch), in launch order."""
    found = []
    for metrics in sorted(exp_dir.glob("logs/*/metrics.jsonl")):
        events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        found.append([e for e in events if e["event"] == kind])
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
        if proc.wait() != 0:
            raise SystemExit(f"action=run failed (exit {proc.returncode})")
        print(f"action=run returned after {time.time() - began:.1f} s (launch latency, supervisor started)",
              flush=True)
        kills: list[dict] = []
        for point in points:
            while not ended(exp_dir):
                current = runs(exp_dir)
                if len(current) == len(kills) + 1 and current[-1] and current[-1][-1]["iteration"] >= point:
                    break
                time.sleep(0.2)
            victims = training_ranks(exp_dir) if not ended(exp_dir) else []
            if not victims:
                raise SystemExit(f"the job ended before iteration {point}")
            victim = rng.choice(victims)
            os.kill(victim, signal.SIGKILL)
            kills.append({"at_iteration": runs(exp_dir)[-1][-1]["iteration"], "time": time.time(), "pid": victim})
            print(f"killed rank pid {victim} at iteration {kills[-1]['at_iteration']}", flush=True)
        while not ended(exp_dir):
            time.sleep(0.5)
        wall = time.time() - began
        launches = runs(exp_dir)
        starts = [run[0] for run in runs(exp_dir, "start")]
        final = events(exp_dir)
        figure = goodput(final)
    state = final[-1].get("state")
    if state != "COMPLETED" or len(launches) != args.kills + 1 or figure is None:
        raise SystemExit(f"job {state}, {len(launches)} launches for {args.kills} kills")
    results = []
    failures = [e for e in final if e["event"] == "failed"]
    relaunches = [e for e in final if e["event"] == "launched"][1:]
    for kill, after, failed, launched, start in zip(kills, launches[1:], failures, relaunches, starts[1:]):
        first = after[0]
        phases = {  # FlagScale's part (notice, relaunch), then the engine's start-up and first iteration
            "notice_s": failed["time"] - kill["time"], "relaunch_s": launched["created"] - failed["time"],
            "startup_s": start["time"] - launched["created"], "first_iteration_s": first["time"] - start["time"],
        }  # fmt: skip
        results.append({"killed_at": kill["at_iteration"], "resumed_at": first["iteration"] - 1,
                        "redone": kill["at_iteration"] - (first["iteration"] - 1),
                        "recovery_s": round(first["time"] - kill["time"], 1),
                        "phases_s": {k: round(v, 1) for k, v in phases.items()},
                        "startup_phases_s": start.get("startup_s", {})})  # fmt: skip
        print(f"kill at {kill['at_iteration']}: resumed from {first['iteration'] - 1}, "
              f"{results[-1]['redone']} iterations redone, first new iteration {results[-1]['recovery_s']} s "
              f"after the kill = " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
              + f" (rank 0 start-up: {start.get('startup_s')})", flush=True)
    goodput_now = figure.ratio  # what `flagscale status` shows: kept iteration time / wall time since the launch
    median = round(statistics.median(r["recovery_s"] for r in results), 1) if results else None
    summary = {"kills": results, "wall_s": round(wall, 1), "iterations": args.iters,
               "goodput": round(goodput_now, 3), "redone": figure.redone,
               "median_recovery_s": median}  # fmt: skip
    out = REPO / "outputs" / "benchmarks" / "recovery.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wall {wall:.1f} s for {args.iters} iterations; median recovery {summary['median_recovery_s']} s; "
          f"wrote {out}")
    print(f"goodput {goodput_now:.3f}")


if __name__ == "__main__":
    main()
