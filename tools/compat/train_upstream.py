"""Train upstream FlagScale's own full-size training YAMLs on this CPU, shrunk by Hydra overrides alone.

    python examples/tiny_gpt/prepare_data.py
    python tools/compat/train_upstream.py --mirror GITDIR [--ref HEAD] [--only deepseek_v3,mixtral]
    python tools/compat/train_upstream.py --upstream DIR

For each model of tools/compat/shrink.py (aquila 7b, deepseek_v3 16b_a3b, mixtral 8x7b, qwen3 30b_a3b,
llama3 8b) it runs this repository's run.py on upstream's `examples/<model>/conf/train.yaml` with
`train=<size> action=test` and the model's shrink overrides, exactly as a user would type them. Upstream's
`experiment.cmds` (they activate upstream's own conda environment) are dropped with a printed note. Prints
one row per model (exit, iterations, first and last loss, seconds) and writes <out>/train_upstream.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run by path: make `tools` importable
    sys.path.insert(0, str(REPO))

from tools.compat import shrink  # noqa: E402
from tools.compat.dryrun_upstream import extract_mirror, git  # noqa: E402

console = Console(highlight=False, soft_wrap=True)


def experiment_fixes(conf_dir: Path) -> list[str]:
    """Overrides for what upstream's experiment YAML assumes of its own machines."""
    experiment = (yaml.safe_load((conf_dir / "train.yaml").read_text()) or {}).get("experiment", {})
    if experiment.get("cmds"):
        console.print(f"note: {conf_dir}/train.yaml: experiment.cmds dropped ({experiment['cmds']})", markup=False)
        return ["~experiment.cmds"]
    return []


def train(model: str, root: Path, data: Path, work: Path, timeout: float) -> dict:
    conf_dir = root / "examples" / model / "conf"
    exp_dir = work / model
    argv = [sys.executable, str(REPO / "run.py"), "--config-path", str(conf_dir), "--config-name", "train",
            *shrink.overrides(model, data, exp_dir), *experiment_fixes(conf_dir)]  # fmt: skip
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        returncode, output = None, "timeout"
    seconds = time.perf_counter() - start
    metrics = sorted(exp_dir.glob("logs/*/metrics.jsonl"))
    events = [json.loads(line) for line in metrics[-1].read_text().splitlines()] if metrics else []
    losses = [(e["iteration"], e["loss"]) for e in events if e.get("event") == "train"]
    return {"model": model, "task": shrink.TASKS[model], "returncode": returncode, "seconds": round(seconds, 1),
            "iterations": losses[-1][0] if losses else 0, "first_loss": losses[0][1] if losses else None,
            "last_loss": losses[-1][1] if losses else None, "argv": argv[1:],
            "tail": output.splitlines()[-8:] if returncode != 0 else []}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--upstream", type=Path, help="An extracted upstream FlagScale tree.")
    source.add_argument("--mirror", type=Path, help="A git directory of upstream FlagScale.")
    parser.add_argument("--ref", default="HEAD")
    parser.add_argument("--only", help="Comma-separated models (default: all).")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "tiny_gpt", help="prepare_data.py's output.")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "compat")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    models = args.only.split(",") if args.only else list(shrink.TASKS)
    unknown = sorted(set(models) - set(shrink.TASKS))
    if unknown:
        parser.error(f"unknown models {', '.join(unknown)}; known: {', '.join(shrink.TASKS)}")
    if not (args.data / "qwen_tokenizer").is_dir():
        parser.error(f"{args.data} lacks the tokenizers; run python examples/tiny_gpt/prepare_data.py")
    with tempfile.TemporaryDirectory(prefix="train_upstream_") as tmp:
        work = Path(tmp)
        root, meta = args.upstream, {"source": str(args.upstream)}
        if args.mirror:
            root = work / "upstream"
            left_out = extract_mirror(args.mirror.resolve(), args.ref, root)
            commit = git(args.mirror.resolve(), "rev-parse", args.ref).decode().strip()
            meta = {"source": "mirror", "commit": commit, "left_out": len(left_out)}
            console.print(f"extracted upstream {commit[:12]}")
        results = []
        for model in models:
            console.print(f"training upstream {model}/conf/train.yaml (train={shrink.TASKS[model]}) ...")
            results.append(train(model, root.resolve(), args.data.resolve(), work / "runs", args.timeout))
    table = Table("model", "task", "exit", "iterations", "first loss", "last loss", "seconds")
    for r in results:
        losses = [f"{loss:.4f}" if loss is not None else "-" for loss in (r["first_loss"], r["last_loss"])]
        table.add_row(r["model"], r["task"], str(r["returncode"]), str(r["iterations"]), *losses, f"{r['seconds']}")
        for line in r["tail"]:
            console.print(f"  {r['model']}: {line}", markup=False)
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "train_upstream.json"
    out.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    console.print(f"wrote {out}")
    sys.exit(0 if all(r["returncode"] == 0 for r in results) else 1)


if __name__ == "__main__":
    main()
