"""Dry-run every experiment YAML of upstream FlagScale's examples/ and classify the outcome.

    python tools/compat/dryrun_upstream.py --upstream DIR [--only PATTERN] [--out outputs/compat]
    python tools/compat/dryrun_upstream.py --mirror GITDIR [--ref HEAD] [--engine ours|upstream|both]

DIR is an extracted upstream FlagScale tree; --mirror extracts GITDIR at REF into a temp dir (blobs the
mirror lacks and submodules are left out and listed). Every `examples/*/conf/*.yaml` with a top-level
`experiment:` key is run as
    python run.py --config-path <conf dir> --config-name <name> action=dryrun experiment.exp_dir=<tmp>/<model>_<name>
Engine `ours` runs this repository's run.py (cwd = repo root, so relative entrypoints resolve here);
engine `upstream` runs upstream's own run.py with cwd = PYTHONPATH = the upstream tree, plus
hydra.run.dir=<exp_dir>/hydra so that Hydra writes nothing into the tree. Upstream's run.py has
no dryrun for serve, so its serve YAMLs are `skipped` unless --include-serve. Modules upstream imports at
start-up that this environment lacks are reported; --stub-missing puts empty stand-ins for them on
PYTHONPATH (a bare `import X` then works, anything using X still fails).

Outcomes: ok (exit 0), reason (one-line `error:` on stderr), unknown-key (that error says "unknown key"),
traceback, timeout, other (non-zero exit without either), skipped. A failure caused by one of upstream's
placeholders (`${data_path:??}`, `xxx`, `/path/to/...`) is marked `placeholder:` in the reason.
Writes <out>/upstream_dryrun.{csv,json} (engine ours) and <out>/upstream_dryrun_upstream_engine.{csv,json}.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[2]
OUTCOMES = ("ok", "reason", "unknown-key", "traceback", "timeout", "other", "skipped")
# Our run.py's line for a placeholder left in a YAML: "KEY: '${...}' is a placeholder to fill in ..."
FILLABLE = re.compile(r"^([\w.\[\]]+): '.*' is a placeholder to fill in")
PLACEHOLDER = re.compile(r"\?\?|Unsupported interpolation type|\bx{3,}\b|\bx(\.x){2,}\b|/path/to/|<x+>")
MISSING_MODULE = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'")
# Wide when piped or captured, so the table keeps one line per YAML.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 220)


@dataclass(frozen=True, slots=True)
class Target:
    """One experiment YAML of upstream's examples/."""

    model: str
    name: str
    conf_dir: Path
    task_type: str


@dataclass(slots=True)
class Result:
    engine: str
    model: str
    yaml: str
    task_type: str
    outcome: str
    reason: str
    placeholder: bool
    seconds: float
    returncode: int | None
    filled: list[str] = field(default_factory=list)
    """Overrides --fill-placeholders added (one per placeholder our run.py named)."""


@dataclass(slots=True)
class Engine:
    """How to start one engine's run.py: interpreter, script, working directory and environment."""

    name: str
    argv0: list[str]
    cwd: Path
    env: dict[str, str]
    stubbed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    starts: bool = True
    start_error: str = ""


# ---------------------------------------------------------------- upstream tree


def git(gitdir: Path, *args: str) -> bytes:
    return subprocess.run(["git", "--git-dir", str(gitdir), *args], capture_output=True, check=True).stdout


def extract_mirror(gitdir: Path, ref: str, dest: Path) -> list[str]:
    """Write the tree at `ref` into `dest`; returns the paths left out (blobs absent, submodules)."""
    left_out: list[str] = []
    entries = [e for e in git(gitdir, "ls-tree", "-r", "-z", ref).decode().split("\0") if e]
    with subprocess.Popen(["git", "--git-dir", str(gitdir), "cat-file", "--batch"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as cat:
        for entry in entries:
            meta, path = entry.split("\t", 1)
            mode, kind, oid = meta.split()
            if kind != "blob" or not write_blob(cat, oid, mode, dest / path):
                left_out.append(path)
        cat.stdin.close()
    return left_out


def write_blob(cat: subprocess.Popen, oid: str, mode: str, target: Path) -> bool:
    cat.stdin.write(f"{oid}\n".encode())
    cat.stdin.flush()
    header = cat.stdout.readline().split()
    if len(header) < 3:  # "<oid> missing"
        return False
    data = cat.stdout.read(int(header[2]) + 1)[:-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode == "120000":
        target.symlink_to(data.decode())
    else:
        target.write_bytes(data)
        if mode == "100755":
            target.chmod(0o755)
    return True


def find_targets(root: Path) -> tuple[list[Target], list[str], int]:
    """Experiment YAMLs, the top-level YAMLs that are not experiments, and the count of task-level ones."""
    targets: list[Target] = []
    not_experiments: list[str] = []
    for path in sorted(root.glob("examples/*/conf/*.yaml")):
        data = load_yaml(path)
        if not isinstance(data, dict) or "experiment" not in data:
            not_experiments.append(f"{path.parents[1].name}/{path.name}")
            continue
        task = ((data.get("experiment") or {}).get("task") or {})
        task_type = task.get("type", "train") if isinstance(task, dict) else "train"
        targets.append(Target(path.parents[1].name, path.stem, path.parent, str(task_type)))
    task_level = sum(1 for _ in root.glob("examples/*/conf/*/**/*.yaml"))
    return targets, not_experiments, task_level


def load_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------- engines


def our_engine(python: str) -> Engine:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    return Engine("ours", [python, str(REPO / "run.py")], REPO, env)


def upstream_engine(python: str, root: Path, stub_dir: Path, stub_missing: bool) -> Engine:
    """Upstream's run.py with its own tree first on PYTHONPATH; probes (and optionally stubs) missing imports."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(stub_dir)])
    engine = Engine("upstream", [python, str(root / "run.py")], root, env)
    for _ in range(20):  # one missing module per probe
        error = probe_imports(engine)
        if not error:
            return engine
        missing = MISSING_MODULE.search(error)
        # Only whole top-level packages get a stand-in: a missing submodule of an installed one is reported.
        if not missing or not stub_missing or "." in missing.group(1) or missing.group(1) in engine.missing:
            engine.starts, engine.start_error = False, error
            if missing and missing.group(1) not in engine.missing:
                engine.missing.append(missing.group(1))
            return engine
        engine.missing.append(missing.group(1))
        engine.stubbed.append(make_stub(stub_dir, missing.group(1)))
    return engine


def probe_imports(engine: Engine) -> str:
    """Import upstream's run.py as a module (its imports, not main()); '' if that works, else the error line."""
    proc = subprocess.run([engine.argv0[0], "-c", "import run"], cwd=engine.cwd, env=engine.env,
                          capture_output=True, text=True, timeout=300)
    return "" if proc.returncode == 0 else error_line(proc.stderr)


def make_stub(stub_dir: Path, module: str) -> str:
    package = stub_dir / module
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""Empty stand-in: the real package is not installed here."""\n')
    return module


# ---------------------------------------------------------------- running and classifying


def run_target(engine: Engine, target: Target, exp_root: Path, timeout: float, fill: bool = False) -> Result:
    """One dryrun; with `fill`, each placeholder our run.py names is filled with a path like a user's and the
    dryrun repeated (what a user gets after filling in their own data/tokenizer/model paths)."""
    exp_dir = exp_root / f"{target.model}_{target.name}"
    argv = [*engine.argv0, "--config-path", str(target.conf_dir), "--config-name", target.name,
            "action=dryrun", f"experiment.exp_dir={exp_dir}"]
    if engine.name == "upstream":  # Hydra's own output (.hydra/, run.log) goes there too, not into the tree
        argv.append(f"hydra.run.dir={exp_dir}/hydra")
    filled: list[str] = []
    started = time.perf_counter()
    while True:
        try:
            proc = subprocess.run([*argv, *filled], cwd=engine.cwd, env=engine.env, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return make_result(engine, target, "timeout", f"no exit within {timeout:.0f}s",
                               time.perf_counter() - started)
        outcome, reason = classify(proc.returncode, proc.stderr)
        key = FILLABLE.match(reason)
        if not fill or key is None or len(filled) >= 6 or any(f.startswith(key.group(1) + "=") for f in filled):
            break
        filled.append(f"{key.group(1)}=/path/to/your/{key.group(1).rsplit('.', 1)[-1]}")
    result = make_result(engine, target, outcome, reason, time.perf_counter() - started, proc.returncode)
    result.filled = filled
    return result


def make_result(engine: Engine, target: Target, outcome: str, reason: str, seconds: float,
                returncode: int | None = None) -> Result:
    placeholder = outcome not in ("ok", "skipped") and bool(PLACEHOLDER.search(reason))
    if placeholder:
        reason = f"placeholder: {reason}"
    return Result(engine.name, target.model, f"{target.name}.yaml", target.task_type, outcome, reason,
                  placeholder, round(seconds, 2), returncode)


def classify(returncode: int, stderr: str) -> tuple[str, str]:
    if returncode == 0:
        return "ok", ""
    reason = error_line(stderr)
    if "Traceback" in stderr:
        return "traceback", reason
    if reason.startswith("error:"):
        return ("unknown-key" if "unknown key" in reason else "reason"), reason.removeprefix("error:").strip()
    return "other", reason or f"exit {returncode}, nothing on stderr"


def error_line(stderr: str) -> str:
    """The one line that says what went wrong: a traceback's exception (with its full_key), else the last line."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return ""
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    if not tracebacks:
        errors = [line for line in lines if line.startswith("error:")]
        return errors[-1] if errors else lines[-1]
    tail = lines[tracebacks[-1] + 1:]
    exc = next((i for i, line in enumerate(tail) if not line.startswith(" ")), None)
    if exc is None:
        return tail[-1].strip() if tail else lines[-1]
    rest = tail[exc + 1:]
    more = [line for line in rest if not line.startswith((" ", "Set the environment variable HYDRA_FULL_ERROR"))]
    full_key = next((line.strip() for line in rest if line.strip().startswith("full_key:")), "")
    message = "; ".join([tail[exc], *more[:2]])
    return f"{message} ({full_key})" if full_key else message


def skipped(engine: Engine, target: Target, why: str) -> Result:
    return Result(engine.name, target.model, f"{target.name}.yaml", target.task_type, "skipped", why, False, 0.0, None)


def run_engine(engine: Engine, targets: list[Target], work: Path, args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    for target in targets:
        if not engine.starts:
            results.append(skipped(engine, target, f"run.py cannot start: {engine.start_error}"))
        elif engine.name == "upstream" and target.task_type == "serve" and not args.include_serve:
            results.append(skipped(engine, target, "upstream run.py has no dryrun for serve"))
        else:
            fill = args.fill_placeholders and engine.name == "ours"
            results.append(run_target(engine, target, work / engine.name, args.timeout, fill))
        if args.verbose:
            console.print(f"  {engine.name} {target.model}/{target.name}: {results[-1].outcome}")
    return results


# ---------------------------------------------------------------- output


def print_results(engine: Engine, results: list[Result], width: int) -> None:
    table = Table(title=f"engine: {engine.name}", show_lines=False)
    for column in ("model", "yaml", "task", "outcome", "s", "reason"):
        table.add_column(column, no_wrap=column != "reason", overflow="fold")
    for r in results:
        reason = r.reason if len(r.reason) <= width else r.reason[: width - 1] + "…"
        table.add_row(r.model, r.yaml, r.task_type, r.outcome, f"{r.seconds:.1f}", reason)
    console.print(table)
    if engine.name == "upstream":
        console.print(f"upstream run.py starts here: {'yes' if engine.starts else 'no'}; "
                      f"missing modules: {', '.join(engine.missing) or 'none'}; "
                      f"stubbed: {', '.join(engine.stubbed) or 'none'}")
    console.print(totals_line(engine.name, results))


def totals(results: list[Result]) -> dict[str, int]:
    counts = Counter(r.outcome for r in results)
    return {o: counts[o] for o in OUTCOMES if counts[o]} | {"placeholder": sum(r.placeholder for r in results)}


def totals_line(name: str, results: list[Result]) -> str:
    non_serve = [r for r in results if r.task_type != "serve"]
    ok_non_serve = sum(r.outcome == "ok" for r in non_serve)
    parts = ", ".join(f"{k} {v}" for k, v in totals(results).items())
    return f"totals {name}: {len(results)} YAMLs: {parts}; ok without serve: {ok_non_serve} of {len(non_serve)}"


def write_outputs(out: Path, engine: Engine, results: list[Result], meta: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("upstream_dryrun" if engine.name == "ours" else "upstream_dryrun_upstream_engine")
    rows = [dataclasses.asdict(r) for r in results]
    with stem.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["engine"])
        writer.writeheader()
        writer.writerows(rows)
    engine_meta = {"engine": engine.name, "starts": engine.starts, "start_error": engine.start_error,
                   "missing_modules": engine.missing, "stubbed_modules": engine.stubbed}
    doc = {**meta, **engine_meta, "totals": totals(results), "results": rows}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    return stem


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--upstream", type=Path, help="an extracted upstream FlagScale tree")
    source.add_argument("--mirror", type=Path, help="a git directory of upstream FlagScale (bare mirror)")
    parser.add_argument("--ref", default="HEAD", help="with --mirror: the commit to extract")
    parser.add_argument("--engine", choices=("ours", "upstream", "both"), default="ours")
    parser.add_argument("--only", help="glob on model/name, e.g. 'aquila/*' or '*train*'")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per YAML")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "compat")
    parser.add_argument("--python", default=sys.executable, help="interpreter for run.py (default: this one)")
    parser.add_argument("--stub-missing", action="store_true",
                        help="upstream engine: empty stand-ins for modules its run.py imports but are not installed")
    parser.add_argument("--include-serve", action="store_true", help="upstream engine: run serve YAMLs too")
    parser.add_argument("--fill-placeholders", action="store_true",
                        help="ours: fill each placeholder run.py names (KEY=/path/to/your/KEY) and dry-run again")
    parser.add_argument("--width", type=int, default=90, help="reason column width")
    parser.add_argument("--verbose", action="store_true", help="a line per YAML as it finishes")
    return parser.parse_args()


def select(targets: list[Target], pattern: str | None) -> list[Target]:
    if not pattern:
        return targets
    return [t for t in targets if fnmatch.fnmatch(f"{t.model}/{t.name}", pattern)
            or fnmatch.fnmatch(t.name, pattern) or fnmatch.fnmatch(t.model, pattern)]


def prepare_tree(args: argparse.Namespace, work: Path) -> tuple[Path, dict]:
    if args.upstream:
        return args.upstream.resolve(), {"source": "extracted tree"}
    root = work / "upstream"
    left_out = extract_mirror(args.mirror.resolve(), args.ref, root)
    commit = git(args.mirror.resolve(), "rev-parse", args.ref).decode().strip()
    console.print(f"extracted upstream {commit[:12]} ({len(left_out)} paths not in the mirror left out)")
    return root, {"source": "mirror", "commit": commit, "left_out": left_out}


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="dryrun_upstream_") as tmp:
        work = Path(tmp)
        root, meta = prepare_tree(args, work)
        targets, not_experiments, task_level = find_targets(root)
        targets = select(targets, args.only)
        console.print(f"{len(targets)} experiment YAMLs; skipped: {task_level} task-level YAMLs in conf subfolders, "
                      f"not experiments: {', '.join(not_experiments) or 'none'}")
        meta |= {"skipped_not_experiments": not_experiments, "skipped_task_level": task_level}
        engines = [our_engine(args.python)] if args.engine in ("ours", "both") else []
        if args.engine in ("upstream", "both"):
            engines.append(upstream_engine(args.python, root, work / "stubs", args.stub_missing))
        for engine in engines:
            results = run_engine(engine, targets, work, args)
            print_results(engine, results, args.width)
            console.print(f"wrote {write_outputs(args.out, engine, results, meta)}.{{csv,json}}")


if __name__ == "__main__":
    main()
