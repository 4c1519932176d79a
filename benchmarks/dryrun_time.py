"""Dry-run wall time of the command a user types first:

    python run.py --config-path examples/aquila/conf --config-name train action=dryrun

run as a subprocess N times (default 5) after one untimed warm-up; prints each time and the median.
With --upstream DIR (an extracted upstream FlagScale tree) upstream's own run.py dry-runs its own
examples/aquila/conf train the same way (cwd = PYTHONPATH = DIR; its `${data_path:??}` placeholder filled
by --upstream-override), side by side, the two commands alternating so that load on the machine hits both.
Also, for ours: one run under `python -X importtime` with the 10 most expensive top-level imports
(cumulative), and one dryrun each of aquila train and train_cluster (--audit) under an audit hook that
lists every socket connect, DNS lookup and subprocess: a hostfile may name hosts that are not this
machine, and dryrun must not need to reach them.

    python benchmarks/dryrun_time.py [--repetitions 5] [--upstream DIR [--stub-missing]]
The last line is `ratio <ours/upstream>` (median over median), or `time <median seconds>` without upstream.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.compat.dryrun_upstream import Engine, error_line, our_engine, upstream_engine  # noqa: E402

# Written as sitecustomize.py into a temp dir on PYTHONPATH: logs what could reach another host.
AUDIT_HOOK = '''import os, sys
_LOG = open(os.environ["DRYRUN_AUDIT_LOG"], "a")
_SHOWN = {"socket.connect": 1, "socket.getaddrinfo": 0, "socket.gethostbyname": 0, "subprocess.Popen": 1}
def _hook(event, args):
    if event in _SHOWN:
        _LOG.write(f"{event} {args[_SHOWN[event]]!r}\\n")
        _LOG.flush()
sys.addaudithook(_hook)
'''


def dryrun_argv(engine: Engine, conf_dir: Path, exp_dir: Path, overrides: list[str], name: str = "train") -> list[str]:
    return [*engine.argv0, "--config-path", str(conf_dir), "--config-name", name, "action=dryrun",
            f"experiment.exp_dir={exp_dir}", *overrides]


def run_once(engine: Engine, argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=engine.cwd, env=env or engine.env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{engine.name} dryrun failed (exit {proc.returncode}): {error_line(proc.stderr)}")
    return elapsed, proc.stderr


def time_runs(commands: dict[str, tuple[Engine, list[str]]], repetitions: int) -> dict[str, list[float]]:
    """Each command once untimed (file caches, bytecode), then alternately, so load drift hits both alike."""
    for engine, argv in commands.values():
        run_once(engine, argv)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(repetitions):
        for name, (engine, argv) in commands.items():
            times[name].append(run_once(engine, argv)[0])
            print(f"  {name:8s} run {i + 1}: {times[name][-1]:.3f}s", flush=True)
    return times


def top_imports(engine: Engine, argv: list[str], count: int = 10) -> None:
    """One run under -X importtime: the most expensive top-level imports, and whether torch is among all."""
    elapsed, stderr = run_once(engine, [argv[0], "-X", "importtime", *argv[1:]])
    rows: list[tuple[int, str]] = []
    torch_us = 0
    for line in stderr.splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        cumulative, name = int(parts[1]), parts[2]
        depth = len(name) - len(name.lstrip())
        if name.strip() == "torch":
            torch_us = max(torch_us, cumulative)
        if depth == 1:
            rows.append((cumulative, name.strip()))
    rows.sort(reverse=True)
    print(f"\nwhere the time goes ({engine.name}, one run under -X importtime: {elapsed:.3f}s, "
          f"top-level imports {sum(r[0] for r in rows) / 1e6:.3f}s)")
    print(f"{'cumulative (ms)':>16s}  top-level import")
    for cumulative, name in rows[:count]:
        print(f"{cumulative / 1000:16.1f}  {name}")
    print(f"torch imported by dryrun: {'yes, ' + f'{torch_us / 1000:.0f} ms' if torch_us else 'no'}")


def audit_reach(engine: Engine, name: str, work: Path) -> None:
    """One dryrun of examples/aquila/conf <name> with an audit hook: any socket connect, DNS lookup or
    subprocess is listed."""
    argv = dryrun_argv(engine, REPO / "examples/aquila/conf", work / f"exp_audit_{name}", [], name)
    hook_dir, log = work / f"audit_{name}", work / f"audit_{name}.log"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    log.touch()
    path = os.pathsep.join(p for p in (str(hook_dir), engine.env.get("PYTHONPATH", "")) if p)
    run_once(engine, argv, {**engine.env, "PYTHONPATH": path, "DRYRUN_AUDIT_LOG": str(log)})
    events = log.read_text().splitlines()
    hosts = ", ".join(hostfile_hosts(REPO / "examples/aquila/conf" / f"{name}.yaml")) or "none"
    print(f"\n{engine.name} dryrun of aquila {name} (hostfile hosts: {hosts}): socket connects, DNS lookups "
          f"and subprocesses: {'none' if not events else len(events)}")
    for event in events[:20]:
        print(f"  {event}")


def hostfile_hosts(config: Path) -> list[str]:
    """Host names in the hostfile the YAML names (relative: beside the YAML); [] without one."""
    runner = ((yaml.safe_load(config.read_text()) or {}).get("experiment") or {}).get("runner") or {}
    if not runner.get("hostfile"):
        return []
    path = config.parent / runner["hostfile"]
    lines = path.read_text().splitlines() if path.is_file() else []
    return [line.split()[0] for line in lines if line.strip() and not line.lstrip().startswith("#")]


def print_side_by_side(results: dict[str, list[float]]) -> None:
    names = list(results)
    print(f"\n{'run':>5s} " + " ".join(f"{n + ' (s)':>14s}" for n in names))
    for i in range(len(next(iter(results.values())))):
        print(f"{i + 1:5d} " + " ".join(f"{results[n][i]:14.3f}" for n in names))
    print(f"{'median':>5s} " + " ".join(f"{statistics.median(results[n]):14.3f}" for n in names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--upstream", type=Path, help="an extracted upstream FlagScale tree to time side by side")
    parser.add_argument("--stub-missing", action="store_true",
                        help="empty stand-ins for modules upstream's run.py imports but are not installed here")
    parser.add_argument("--upstream-override", action="append", default=None,
                        help="fills upstream's placeholders (default: train.data.data_path=<tmp>/data/aquila)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--audit", type=lambda v: v.split(","), default=["train", "train_cluster"],
                        help="aquila configs dry-run once under the network audit (those that exist)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dryrun_time_") as tmp:
        work = Path(tmp)
        ours = our_engine(args.python)
        ours_argv = dryrun_argv(ours, REPO / "examples/aquila/conf", work / "exp_ours", [])
        commands = {"ours": (ours, ours_argv)} | upstream_command(args, work)
        results = time_runs(commands, args.repetitions)
        print_side_by_side(results)
        top_imports(ours, ours_argv)
        for name in args.audit:
            if (REPO / "examples/aquila/conf" / f"{name}.yaml").is_file():
                audit_reach(ours, name, work)
    median = statistics.median(results["ours"])
    if "upstream" in results:
        print(f"ratio {median / statistics.median(results['upstream']):.2f}")
    else:
        print(f"time {median:.3f}")


def upstream_command(args: argparse.Namespace, work: Path) -> dict[str, tuple[Engine, list[str]]]:
    """Upstream's run.py on its own aquila train, or nothing when it cannot start here."""
    if not args.upstream:
        return {}
    root = args.upstream.resolve()
    engine = upstream_engine(args.python, root, work / "stubs", args.stub_missing)
    if not engine.starts:
        print(f"upstream run.py cannot start here: {engine.start_error} (try --stub-missing)")
        return {}
    if engine.stubbed:
        print(f"upstream: empty stand-ins for missing modules: {', '.join(engine.stubbed)}")
    overrides = args.upstream_override or [f"train.data.data_path={work / 'data' / 'aquila'}"]
    return {"upstream": (engine, dryrun_argv(engine, root / "examples/aquila/conf", work / "exp_upstream", overrides))}


if __name__ == "__main__":
    main()
