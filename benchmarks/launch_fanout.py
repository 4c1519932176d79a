"""Launch fan-out over real SSH: N loopback sshd hosts (N = 1, 2, 4, 8, 16).

Measures the commands a user types, `python run.py ... action=run` and `... action=stop`:
  start: from starting the run command to the job's process existing on every host
  stop:  from starting the stop command to every process gone
with a light per-host command (a shell sleeper, runner.backend=direct) and with real torchrun
(a Python sleeper as torchrun's worker program). Prints a table and, last,
`ratio <t(16)/t(1) with the light command>`.

    python benchmarks/launch_fanout.py [--sizes 1,2,4,8,16] [--no-torchrun] [--login-rc]
Needs root and openssh-server (sshd); only loopback addresses 127.0.0.10-127.0.0.41 are used.
All hosts share this machine's cores, so whatever each host's login shell runs is paid N times on
the same CPU: by default the test hosts' HOME is the benchmark's own (no ~/.bashrc); --login-rc
keeps this machine's root ~/.bashrc on every host.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import pids_alive, tiny_overrides  # noqa: E402
from tests.helpers.sshd import SSHCluster  # noqa: E402

# The light command is a shell sleeper; torchrun needs a Python program, so it gets the Python one.
SLEEPERS = {False: REPO / "tests" / "helpers" / "sleeper.sh", True: REPO / "tests" / "helpers" / "sleeper.py"}


def measure(cluster: SSHCluster, data: Path, work: Path, hosts: int, torchrun: bool) -> tuple[float, float]:
    work.mkdir(parents=True, exist_ok=True)
    exp = work / f"{'torchrun' if torchrun else 'light'}_{hosts}"
    hostfile = cluster.hostfile(work / f"hostfile_{hosts}.txt", servers=cluster.servers[:hosts])
    overrides = [
        *tiny_overrides(data, exp), f"+experiment.runner.hostfile={hostfile}", "experiment.runner.nnodes=null",
        "experiment.runner.nproc_per_node=1", f"experiment.runner.backend={'torchrun' if torchrun else 'direct'}",
        f"experiment.task.entrypoint={SLEEPERS[torchrun]}", f"+experiment.envs.SLEEPER_DIR={exp / 'sleepers'}",
        "+experiment.envs.GLOO_SOCKET_IFNAME=lo", "train.model.global_batch_size=" + str(4 * hosts),
    ]
    started = time.time()
    launched = run_py("action=run", *overrides)
    if launched.returncode != 0:
        raise SystemExit(f"launch on {hosts} hosts failed:\n{launched.stderr}")
    infos = wait_for_sleepers(exp / "sleepers", hosts, timeout=120)
    start_s = max(i["time"] for i in infos) - started
    stop_started = time.time()
    stopped = run_py("action=stop", f"experiment.exp_dir={exp}")
    pids = [i["pid"] for i in infos]
    while pids_alive(pids) and time.time() - stop_started < 60:
        time.sleep(0.02)
    stop_s = time.time() - stop_started
    if stopped.returncode != 0 or pids_alive(pids):
        raise SystemExit(f"stop failed for {hosts} hosts:\n{stopped.stdout}")
    return start_s, stop_s


def run_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run.py"), "--config-path", str(REPO / "examples/tiny_gpt/conf"),
                           "--config-name", "train", *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def wait_for_sleepers(folder: Path, count: int, timeout: float) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        files = list(folder.glob("*.json")) if folder.exists() else []
        if len(files) >= count:
            return [json.loads(f.read_text()) for f in files]
        time.sleep(0.01)
    raise SystemExit(f"only {len(files)} of {count} host processes started within {timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,2,4,8,16")
    parser.add_argument("--no-torchrun", action="store_true", help="skip the real-torchrun rows")
    parser.add_argument("--login-rc", action="store_true", help="hosts run this machine's ~/.bashrc per command")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="fanout_") as tmp:
        work = Path(tmp)
        data = work / "data"
        subprocess.run([sys.executable, str(REPO / "examples/tiny_gpt/prepare_data.py"), "--output-dir", str(data)],
                       check=True, capture_output=True)
        cluster = SSHCluster(work / "ssh", host_home=not args.login_rc)
        try:
            for i in range(max(sizes)):
                cluster.start(f"127.0.0.{10 + i}")
            os.environ["HOME"] = str(cluster.home)
            rows = run_all(cluster, data, work, sizes, not args.no_torchrun)
        finally:
            cluster.stop_all()
    print_table(rows, sizes)


def run_all(cluster: SSHCluster, data: Path, work: Path, sizes: list[int], torchrun: bool) -> dict:
    rows: dict[tuple[str, int], tuple[float, float]] = {}
    measure(cluster, data, work / "warmup", 1, False)  # untimed: warms file caches and bytecode
    for kind in ("light", "torchrun") if torchrun else ("light",):
        for n in sizes:
            rows[(kind, n)] = measure(cluster, data, work, n, kind == "torchrun")
            print(f"  {kind:8s} hosts={n:2d}: start {rows[(kind, n)][0]:.2f}s, stop {rows[(kind, n)][1]:.2f}s",
                  flush=True)
    return rows


def print_table(rows: dict, sizes: list[int]) -> None:
    print(f"\n{'command':10s} {'hosts':>5s} {'start (s)':>10s} {'stop (s)':>9s}")
    for (kind, n), (start_s, stop_s) in sorted(rows.items()):
        print(f"{kind:10s} {n:5d} {start_s:10.2f} {stop_s:9.2f}")
    first, last = rows[("light", sizes[0])][0], rows[("light", sizes[-1])][0]
    print(f"ratio {last / first:.2f}")


if __name__ == "__main__":
    main()
