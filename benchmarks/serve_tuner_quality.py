"""How good is the serving auto-tuner's search? On the space of examples/tiny_gpt/conf/serve_auto_tune.yaml (26 real
configurations: vLLM 2, llama.cpp 24), with real servers and real loads:

0. the model: `--model small` (default), a randomly initialised Llama of 27M parameters (hidden 512, 8 layers,
   the tiny GPT's tokenizer) on which the settings matter (llama.cpp: 160 to 360 tokens/s across slots and threads
   here); `--model tiny`, the trained tiny GPT the tests use, whose llama.cpp configurations all lie within the
   measurement noise (~±15%) — there any search is as good as any other;
1. the full grid (control.search=grid): every configuration measured once — the reference;
2. the SLO: `--slo METRIC=BOUND` (a latency), or by default a bound on itl_p95_ms in the widest gap between the
   grid's values in their middle half (about half of the configurations miss it, and none lies within noise of
   it): more slots raise throughput and the inter-token latency, so the bound decides;
3. the tuner (control.search=climb, the default) under that SLO, in a fresh directory: its own real trials;
4. baselines read off the grid's measurements: random search with the same number of trials (median of 5 seeds),
   and the configured settings alone (the deployment as the YAML gives it, no tuning);
5. replays: the search rule run against the grid's measurements (no new trials, no run-to-run noise) at SLO
   bounds across the range, each with random search given the same number of trials.

Ratios are against the grid's best under the SLO (throughput, higher is better): the tuner's by the grid's
measurement of the configuration it chose (the last line: the same measurement on both sides) and by its own.
Writes <out>/serve_tuner_quality.json; last lines `trials ratio <x>` and `quality ratio <y>`.

    python benchmarks/serve_tuner_quality.py [--model small|tiny] [--slo itl_p95_ms=12] [--seeds 5]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_engines import free_port, models  # noqa: E402

METRIC = "output_tokens_per_s"
CONFIGURED = "llama_cpp:parallel=2,threads=2,batch_size=64"
"""The example's own settings (engine llama_cpp, max_num_seqs 2 = parallel, threads 2, batch_size 64)."""


def small_model(scratch: Path, tiny_hf: Path) -> tuple[Path, Path]:
    """A random Llama (hidden 512, 8 layers, 8 heads of 64) with the tiny GPT's tokenizer, in HF format and GGUF."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = scratch / "small" / "hf"
    config = json.loads((tiny_hf / "config.json").read_text())
    config.update(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, head_dim=64)
    config = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(hf)
    for path in tiny_hf.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "generation")):
            shutil.copy(path, hf / path.name)
    gguf = scratch / "small" / "gguf" / "model.gguf"
    subprocess.run([sys.executable, str(REPO / "tools/checkpoint/convert_hf_to_gguf.py"), "--input", str(hf),
                    "--output", str(gguf)], check=True, stdout=subprocess.DEVNULL)
    return hf, gguf


def tune(exp: Path, hf: Path, gguf: Path, port: int, *extra: str) -> list[dict[str, str]]:
    env = {**os.environ, "VLLM_CACHE_ROOT": str(exp / "cache"), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1"}
    argv = [sys.executable, str(REPO / "run.py"), "--config-path", str(REPO / "examples/tiny_gpt/conf"),
            "--config-name", "serve_auto_tune", f"experiment.exp_dir={exp}", f"serve.0.engine_args.model={hf}",
            f"serve.0.engine_args_specific.llama_cpp.model={gguf}", f"serve.0.engine_args.port={port}",
            "experiment.auto_tuner.control.max_trials=null", *extra]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"the tuner failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with (exp / "auto_tuner" / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


def gap_bound(values: list[float], low: float = 0.25, high: float = 0.75) -> float:
    """The geometric middle of the widest (by ratio) gap between consecutive sorted values in [low, high] quantiles."""
    ordered = sorted(values)
    pairs = list(itertools.pairwise(ordered))[int(low * len(ordered)):int(high * len(ordered))]
    a, b = max(pairs, key=lambda pair: pair[1] / pair[0])
    return (a * b) ** 0.5


def replay(grid: list[dict[str, str]], bound: float, seeds: int) -> tuple[int, float, float]:
    """The climb against the grid's measurements under itl_p95_ms <= bound: (trials, quality, random quality)."""
    from flagscale.auto_tuner.history import TrialStatus
    from flagscale.auto_tuner.serve.config import METRICS
    from flagscale.auto_tuner.serve.history import ServeResult
    from flagscale.auto_tuner.serve.search import Objective, ServeSearch
    from flagscale.auto_tuner.serve.space import ServeCandidate

    order = {"vllm": {"max_num_seqs": [2, 8]},
             "llama_cpp": {"parallel": [1, 2, 4, 8], "threads": [1, 2], "batch_size": [16, 64, 256]}}
    targets = {"vllm": {"max_num_seqs": 2}, "llama_cpp": {"parallel": 2, "threads": 2, "batch_size": 64}}
    candidates = [ServeCandidate(r["engine"], tuple((k, v) for k, v in json.loads(r["settings"]))) for r in grid]
    results = {c.key: ServeResult(trial=i, candidate=c, status=TrialStatus.OK,
                                  figures={k: float(r[k]) if r[k] else None for k in METRICS})
               for i, (c, r) in enumerate(zip(candidates, grid), 1)}
    objective = Objective(metric=METRIC, slo={"itl_p95_ms": bound})
    search, seen = ServeSearch(candidates, order, targets, objective), {}
    while (step := search.next(seen)).candidate is not None:
        seen[step.candidate.key] = results[step.candidate.key]
    truth = objective.best(list(results.values()))
    top = truth.metric(METRIC) if truth else 1.0

    def score(rows) -> float:
        found = objective.best(rows)
        return (found.metric(METRIC) or 0.0) / (top or 1.0) if found else 0.0

    randoms = [score(random.Random(seed).sample(list(results.values()), len(seen))) for seed in range(seeds)]
    return len(seen), score(list(seen.values())), statistics.median(randoms)


def meets(row: dict[str, str], slo: tuple[str, float]) -> bool:
    return row["status"] == "ok" and bool(row[slo[0]]) and float(row[slo[0]]) <= slo[1]


def best(rows: list[dict[str, str]], slo: tuple[str, float]) -> dict[str, str] | None:
    ok = [r for r in rows if meets(r, slo)]
    return max(ok, key=lambda r: float(r[METRIC])) if ok else None


def value(row: dict[str, str] | None) -> float:
    return float(row[METRIC]) if row else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("small", "tiny"), default="small")
    parser.add_argument("--hf", type=Path, help="the tiny GPT's Hugging Face folder (default: train one)")
    parser.add_argument("--gguf", type=Path, help="its GGUF file (default: convert --hf)")
    parser.add_argument("--slo", help="METRIC=BOUND, a latency bound (default: itl_p95_ms at the grid's median)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench")
    parser.add_argument("--scratch", type=Path, help="work folder (default: a new temporary one); an earlier run's "
                        "folder resumes its grid and tuner histories")
    args = parser.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="serve-tuner-"))
    hf, gguf = (args.hf, args.gguf) if args.hf and args.gguf else models(scratch)
    if args.model == "small":
        small = scratch / "small" / "hf", scratch / "small" / "gguf" / "model.gguf"
        hf, gguf = small if small[1].is_file() else small_model(scratch, hf)
    port = free_port()

    print("grid: every configuration ...", flush=True)
    grid = tune(scratch / "grid", hf, gguf, port, "experiment.auto_tuner.control.search=grid")
    if args.slo:
        name, _, bound = args.slo.partition("=")
        slo = (name, float(bound))
    else:
        slo = ("itl_p95_ms", gap_bound([float(r["itl_p95_ms"]) for r in grid if r["status"] == "ok"]))
    truth = best(grid, slo)
    if truth is None:
        raise SystemExit(f"no grid configuration meets {slo[0]} <= {slo[1]:g}")
    print(f"SLO {slo[0]} <= {slo[1]:.2f}: {sum(meets(r, slo) for r in grid)} of {len(grid)} grid configurations meet "
          f"it; grid best {truth['key']} {value(truth):,.0f} {METRIC}", flush=True)

    print("climb: the tuner under that SLO ...", flush=True)
    climb = tune(scratch / "climb", hf, gguf, port, "~experiment.auto_tuner.performance.slo",
                 f"+experiment.auto_tuner.performance.slo.{slo[0]}={slo[1]}")
    chosen = best(climb, slo)
    by_grid = {r["key"]: r for r in grid}
    chosen_in_grid = by_grid.get(chosen["key"]) if chosen else None
    trials = len(climb)

    randoms = []
    for seed in range(args.seeds):
        sample = random.Random(seed).sample(grid, trials)
        randoms.append(value(best(sample, slo)) / value(truth))
    configured = by_grid.get(CONFIGURED)
    configured_ok = configured is not None and meets(configured, slo)
    figures = {
        "model": args.model, "grid_candidates": len(grid), "slo": {slo[0]: slo[1]}, "grid_best": truth["key"],
        "grid_best_value": value(truth),
        "tuner_trials": trials, "tuner_best": chosen["key"] if chosen else None, "tuner_best_value": value(chosen),
        "tuner_choice_in_grid_value": value(chosen_in_grid) if chosen_in_grid and meets(chosen_in_grid, slo) else 0.0,
        "random_search_ratios": [round(r, 3) for r in randoms], "random_search_median": statistics.median(randoms),
        "configured_value": value(configured), "configured_meets_slo": configured_ok,
        "startup_s_median": {e: statistics.median(float(r["startup_s"]) for r in grid if r["engine"] == e and
                                                  r["startup_s"]) for e in ("vllm", "llama_cpp")},
        "trial_s_median": {e: statistics.median(float(r["elapsed_s"]) for r in grid if r["engine"] == e)
                           for e in ("vllm", "llama_cpp")},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_tuner_quality.json").write_text(json.dumps(figures, indent=2) + "\n")
    trials_ratio = trials / len(grid)
    quality = figures["tuner_choice_in_grid_value"] / value(truth)  # the same measurement on both sides
    own = value(chosen) / value(truth)
    print("| | configuration | output tokens/s | vs grid best |\n|---|---|---|---|")
    print(f"| grid best ({len(grid)} trials) | {truth['key']} | {value(truth):,.0f} | 1.000 |")
    print(f"| tuner ({trials} trials), its measurement | {figures['tuner_best']} | {value(chosen):,.0f} | "
          f"{own:.3f} |")
    print(f"| tuner's choice, grid's measurement | | {figures['tuner_choice_in_grid_value']:,.0f} | "
          f"{quality:.3f} |")
    print(f"| random search ({trials} trials, median of {args.seeds} seeds) | | | "
          f"{figures['random_search_median']:.3f} |")
    print(f"| configured settings (no tuning) | {CONFIGURED} | {value(configured):,.0f} | "
          f"{value(configured) / value(truth):.3f}{'' if configured_ok else ' (misses the SLO)'} |")
    print(f"start-up median (s): {figures['startup_s_median']}; trial median (s): {figures['trial_s_median']}")
    if configured and value(configured):
        print(f"the tuner's choice beats the configured settings by "
              f"{figures['tuner_choice_in_grid_value'] / value(configured):.2f}x (grid's measurements; "
              f"{value(chosen) / value(configured):.2f}x by the tuner's own)")
    itl = [float(r["itl_p95_ms"]) for r in grid if r["status"] == "ok"]
    print("replays of the search on the grid's measurements (itl_p95_ms bound: trials, quality, random search "
          "quality, median of seeds):")
    replays = {}
    for low in (0.1, 0.25, 0.4, 0.55, 0.7):
        bound = gap_bound(itl, low, low + 0.2)
        replays[round(bound, 2)] = replay(grid, bound, args.seeds)
    replays["none"] = replay(grid, 1e12, args.seeds)
    for bound, (n, replayed, baseline) in replays.items():
        print(f"  <= {bound}: {n} trials ({n / len(grid):.2f} of the grid), quality {replayed:.3f}, "
              f"random {baseline:.3f}")
    figures["replays"] = {str(k): {"trials": n, "quality": q, "random": b} for k, (n, q, b) in replays.items()}
    (args.out / "serve_tuner_quality.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written: {args.out / 'serve_tuner_quality.json'}")
    print(f"trials ratio {trials_ratio:.3f}")
    print(f"quality ratio (the tuner's own measurement of its choice) {own:.3f}")
    print(f"quality ratio {quality:.3f}")


if __name__ == "__main__":
    main()
