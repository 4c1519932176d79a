"""Slurm versus SSH on the same two loopback nodes: the tiny GPT, 2 nodes x 1 process, the same arguments.

Starts a private Slurm cluster (tests/helpers/slurm.py: nodes n1, n2 on 127.0.0.61/62) and two sshd on the same
addresses (tests/helpers/sshd.py), then runs the tiny_gpt example with `run.py action=run` alternately through
each (runner.type=slurm, and runner.type=ssh with a hostfile of the two sshd), and reports for each:

* launch to first iteration: from typing `run.py action=run` to the first logged training iteration (the time
  of that event in metrics.jsonl), which includes FlagScale's planning and launch, Slurm's scheduling (or the SSH
  fan-out), torchrun's rendezvous and Megatron-Core's start-up;
* `run` returns after: how long the command itself took (sbatch vs SSH start on both hosts);
* tokens/s: the median of the logged iterations after warm-up.

Last line: `ratio <slurm tokens/s / ssh tokens/s>` (both medians over the repeats). Needs root, slurm-wlm, munge
and openssh-server (bash install/install-requirements.sh --env all --system) and the tiny data.

    python benchmarks/slurm_overhead.py [--iters 80] [--repeats 2]
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

from flagscale import jobs  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402
from tests.helpers.slurm import SlurmCluster, slurm_available  # noqa: E402
from tests.helpers.sshd import SSHCluster, sshd_available  # noqa: E402

ADDRESSES = ("127.0.0.61", "127.0.0.62")
WARMUP = 10


def events(exp: Path) -> list[dict]:
    found = list(exp.glob("logs/*/metrics.jsonl"))
    if not found:
        return []
    return [json.loads(line) for line in found[0].read_text().splitlines() if line.strip()]


def launch(mode: str, exp: Path, data: Path, iters: int, env: dict[str, str], hostfile: Path) -> dict[str, float]:
    where = (["+experiment.runner.type=slurm"] if mode == "slurm" else [f"+experiment.runner.hostfile={hostfile}"])
    argv = [sys.executable, str(REPO / "run.py"), "--config-path", str(REPO / "examples/tiny_gpt/conf"),
            "--config-name", "train", "action=run", *tiny_overrides(data, exp, train_iters=iters, eval_interval=iters,
                                                                     eval_iters=1),
            "train.system.logging.log_interval=1", f"train.system.checkpoint.save_interval={iters}",
            "experiment.runner.nnodes=2", "experiment.runner.nproc_per_node=1",
            "+experiment.envs.GLOO_SOCKET_IFNAME=lo", *where]
    began = time.time()
    subprocess.run(argv, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    returned = time.time() - began
    deadline = time.time() + 600
    while not any(e["event"] == "end" for e in events(exp)):
        if time.time() > deadline:
            raise SystemExit(f"{mode}: the job did not end within 600 s (see {exp}/logs)")
        time.sleep(0.5)
    while not jobs.status(exp).state.is_terminal():  # the job's processes have ended too, not just its loop
        if time.time() > deadline:
            raise SystemExit(f"{mode}: the job's processes did not end within 600 s (see {exp}/logs)")
        time.sleep(0.5)
    logged = events(exp)
    first = min(e["time"] for e in logged if e["event"] == "train")
    rates = [e["tokens_per_s"] for e in logged if e["event"] == "train" and e["iteration"] > WARMUP]
    return {"first_iteration_s": first - began, "returned_s": returned, "tokens_per_s": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not (slurm_available() and sshd_available()):
        raise SystemExit("needs root, slurm-wlm, munge and openssh-server: "
                         "bash install/install-requirements.sh --env all --system")
    scratch = Path(tempfile.mkdtemp(prefix="slurm-overhead-"))
    data = scratch / "data"
    subprocess.run([sys.executable, str(REPO / "examples/tiny_gpt/prepare_data.py"), "--output-dir", str(data)],
                   check=True, stdout=subprocess.DEVNULL)
    slurm = SlurmCluster(scratch / "slurm", nodes=2, first_address=61)
    ssh = SSHCluster(scratch / "ssh")
    results: dict[str, list[dict[str, float]]] = {"slurm": [], "ssh": []}
    try:
        slurm.start()
        for addr in ADDRESSES:
            ssh.start(addr)
        hostfile = ssh.hostfile(scratch / "hostfile.txt")
        env = {**os.environ, **slurm.env, **ssh.env}
        os.environ.update(env)  # this process asks for the jobs' states too: Slurm's config, the test hosts' keys
        for repeat in range(args.repeats):
            for mode in ("slurm", "ssh") if repeat % 2 == 0 else ("ssh", "slurm"):
                figures = launch(mode, scratch / f"{mode}-{repeat}", data, args.iters, env, hostfile)
                results[mode].append(figures)
                print(f"{mode:5} run {repeat + 1}: first iteration after {figures['first_iteration_s']:.1f} s, "
                      f"run returned after {figures['returned_s']:.2f} s, {figures['tokens_per_s']:,.0f} tokens/s",
                      flush=True)
    finally:
        ssh.stop_all()
        slurm.stop()
    print("\n| through | launch to first iteration (s) | run returns (s) | tokens/s (median) |\n|---|---|---|---|")
    medians = {}
    for mode, runs in results.items():
        medians[mode] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        m = medians[mode]
        print(f"| {mode} | {m['first_iteration_s']:.1f} | {m['returned_s']:.2f} | {m['tokens_per_s']:,.0f} |")
    print(f"ratio {medians['slurm']['tokens_per_s'] / medians['ssh']['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
