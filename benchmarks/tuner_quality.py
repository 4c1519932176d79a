"""How good is the auto-tuner's answer, and how many trials does it burn?

On the tiny GPT (small variant: 2 layers, hidden 64, seq 64; 2 processes, gloo on CPU) over the
space tp ∈ {1,2} × pp ∈ {1,2} × dp × mbs ∈ {1,2,4,8} × distributed optimizer ∈ {off, on} (16 valid
candidates: the distributed optimizer only exists with dp 2), it runs

1. the exhaustive grid, `--grid-passes` times (default 2, at different times: this shared machine's
   load changes from minute to minute): action=auto_tune with the early stop switched off
   (stop_margin 1e9), so every candidate runs through exactly the same trial path; a candidate's
   grid value is the geometric mean of its passes;
2. the tuner: action=auto_tune as a user runs it (default stop_margin);
3. replays of the tuner's search against the grid's measurements (no new trials: the search rule
   alone, free of run-to-run noise).

and prints `trials ratio <tuner trials / grid size>` and `quality ratio <grid tokens/s of the
tuner's pick / grid best>` (the same measurement on both sides of the ratio), plus the tuner's own
measurement of its pick. Each step resumes from its history.csv, so a rerun only adds what is
missing. Metric: median tokens/s over the iterations after warm-up.

    python benchmarks/tuner_quality.py [--out outputs/tuner_quality] [--iterations 50] [--grid-passes 2]
"""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flagscale.auto_tuner.history import TrialResult, TrialStatus, from_row  # noqa: E402
from flagscale.auto_tuner.search import Search  # noqa: E402

SMALL = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 176, "num_attention_heads": 2, "seq_length": 64,
         "max_position_embeddings": 64}
CONF = ["--config-path", str(REPO / "examples/tiny_gpt/conf"), "--config-name", "auto_tune"]


def overrides(data: Path, exp_dir: Path, iterations: int, extra: list[str]) -> list[str]:
    """The benchmark's job: small model, the given data, the fixed space."""
    space = "experiment.auto_tuner.space"
    return [
        f"experiment.exp_dir={exp_dir}",
        f"train.data.data_path=[0.7,{data}/stories_text_document,0.3,{data}/facts_text_document]",
        f"train.data.tokenizer.tokenizer_model={data}/tokenizer",
        *[f"train.model.{k}={v}" for k, v in SMALL.items()],
        f"++{space}.tensor_model_parallel_size=[1,2]", f"++{space}.pipeline_model_parallel_size=[1,2]",
        f"++{space}.micro_batch_size=[1,2,4,8]", f"++{space}.use_distributed_optimizer=[false,true]",
        f"++{space}.recompute_granularity=null",
        f"++experiment.auto_tuner.control.iterations={iterations}",
        "++experiment.auto_tuner.control.warmup_iterations=5",
        "++experiment.auto_tuner.control.max_trials=null", "++experiment.auto_tuner.control.max_time_s=null",
        *extra,
    ]


def auto_tune(args: list[str]) -> None:
    """python run.py ... action=auto_tune, output shown as it comes."""
    command = [sys.executable, str(REPO / "run.py"), *CONF, "action=auto_tune", *args]
    status = subprocess.run(command, cwd=REPO).returncode
    if status != 0:
        raise SystemExit(f"auto_tune exited with {status}: {' '.join(command)}")


def load(history: Path, keys: set[str]) -> dict[str, TrialResult]:
    """The trials of a history.csv by candidate key, only those of the benchmark's space."""
    with history.open(newline="", encoding="utf-8") as handle:
        return {r.candidate.key: r for r in map(from_row, csv.DictReader(handle)) if r.candidate.key in keys}


def tuner_for(config_overrides: list[str]):
    """The Tuner of a benchmark job (for its plan and workload), as run.py would build it."""
    from flagscale.auto_tuner.tuner import Tuner
    from flagscale.config.loader import load_job_config
    from flagscale.main import compose_config

    cfg, source = compose_config(REPO / "examples/tiny_gpt/conf", "auto_tune", config_overrides)
    return Tuner(load_job_config(cfg, source))


def truth(passes: list[dict[str, TrialResult]]) -> dict[str, float]:
    """Tokens/s per candidate: the geometric mean over the grid passes (0 for a failed candidate)."""
    values: dict[str, float] = {}
    for key in passes[0]:
        samples = [p[key].tokens_per_s or 0.0 for p in passes if key in p]
        values[key] = math.prod(samples) ** (1 / len(samples)) if all(samples) else 0.0
    return values


def replay(tuner, measured: dict[str, float]) -> list[str]:
    """The tuner's search run against fixed measurements; the keys it would have tried, in order."""
    from flagscale.auto_tuner.cost import PROFILES, Predictor

    plan = tuner.plan()
    search = Search(plan.candidates, Predictor(tuner.work, PROFILES["cpu"]), tuner.config.control.stop_margin)
    tokens = tuner.work.global_batch_size * tuner.work.seq_length
    seen: dict[str, TrialResult] = {}
    while (step := search.next(seen)).candidate is not None:
        value = measured[step.candidate.key]
        status = TrialStatus.OK if value else TrialStatus.FAILED
        seen[step.candidate.key] = TrialResult(trial=len(seen) + 1, candidate=step.candidate, status=status,
                                               tokens_per_s=value or None,
                                               step_time_ms=1000 * tokens / value if value else None)
    return list(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs/tuner_quality")
    parser.add_argument("--data", type=Path, default=REPO / "data/tiny_gpt")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--grid-passes", type=int, default=2, help="grid measurements per candidate (noise)")
    opts = parser.parse_args()
    if not (opts.data / "stories_text_document.bin").is_file():
        subprocess.run([sys.executable, str(REPO / "examples/tiny_gpt/prepare_data.py"), "--output-dir",
                        str(opts.data)], check=True)
    no_early_stop = ["++experiment.auto_tuner.control.stop_margin=1e9"]
    grids = [opts.out / f"grid{i + 1}" for i in range(opts.grid_passes)]
    tuner_args = overrides(opts.data, opts.out / "tuner", opts.iterations, [])
    for grid_dir in grids:
        auto_tune(overrides(opts.data, grid_dir, opts.iterations, no_early_stop))
    auto_tune(tuner_args)
    tuner = tuner_for(tuner_args)
    keys = {c.key for c in tuner.plan().all_valid}
    passes = [load(d / "auto_tuner/history.csv", keys) for d in grids]
    tuned = load(opts.out / "tuner/auto_tuner/history.csv", keys)
    grid = truth(passes)
    top = max(grid, key=grid.__getitem__)
    pick = max((r for r in tuned.values() if r.tokens_per_s), key=lambda r: r.tokens_per_s or 0.0)
    describe = {c.key: c.describe() for c in tuner.plan().all_valid}
    per_pass = ", ".join(describe[max(p, key=lambda k: p[k].tokens_per_s or 0.0)] for p in passes)
    print(f"grid: {len(grid)} valid candidates × {len(passes)} pass(es); best {describe[top]} "
          f"{grid[top]:,.0f} tokens/s (best per pass: {per_pass})")
    print(f"tuner: {len(tuned)} trials, picked {describe[pick.candidate.key]} ({pick.tokens_per_s:,.0f} tokens/s "
          f"in its own trial, {grid[pick.candidate.key]:,.0f} in the grid)")
    print(f"trials ratio {len(tuned) / len(grid):.3f}")
    print(f"quality ratio {grid[pick.candidate.key] / grid[top]:.3f}")
    print(f"quality ratio (tuner's own measurement of its pick) {pick.tokens_per_s / grid[top]:.3f}")
    order = replay(tuner, grid)
    replay_pick = max(order, key=grid.__getitem__)
    print(f"replay on the grid's measurements: {len(order)} trials, trials ratio {len(order) / len(grid):.3f}, "
          f"quality ratio {grid[replay_pick] / grid[top]:.3f}")
    for i, p in enumerate(passes, 1):
        measured = {k: r.tokens_per_s or 0.0 for k, r in p.items()}
        order = replay(tuner, measured)
        best_here = max(measured.values())
        print(f"replay on grid pass {i}: {len(order)} trials, quality ratio "
              f"{measured[max(order, key=measured.__getitem__)] / best_here:.3f} (of that pass's best)")


if __name__ == "__main__":
    main()
