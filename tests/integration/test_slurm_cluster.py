"""The private Slurm cluster the Slurm tests run on (tests/helpers/slurm.py) is a real one: two slurmd nodes run
one srun step's tasks with their node ids, a 2-node batch job completes and is recorded in the jobcomp file, and
scancel ends a running job's tasks on both nodes."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import pids_alive
from tests.helpers.requires import requirement
from tests.helpers.slurm import SlurmCluster, slurm_available

pytestmark = pytest.mark.integration
_slurm = requirement(slurm_available(), "needs root, slurm-wlm and munge (bash install/install-requirements.sh "
                                        "--env all --system)")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SlurmCluster]:
    started = SlurmCluster(tmp_path / "slurm", nodes=2)
    started.start()
    daemons = [p.pid for p in started.procs]
    assert len(daemons) == 2 + 2  # munged, slurmctld, two slurmd
    try:
        yield started
    finally:
        started.stop()
    assert not pids_alive(daemons)


def run(cluster: SlurmCluster, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, env=cluster.env, timeout=60)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f}s"
        time.sleep(0.2)


def test_a_step_runs_one_task_per_node(cluster: SlurmCluster) -> None:
    done = run(cluster, "srun", "-N2", "--ntasks-per-node=1", "bash", "-c", "echo $SLURM_NODEID $SLURMD_NODENAME")
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split("\n")[:2]) == ["0 n1", "1 n2"], done.stdout


def test_batch_job_completes_and_scancel_ends_every_task(cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH -N 2\n#SBATCH --ntasks-per-node=1\n"
                      f"#SBATCH --output={tmp_path}/out-%j.txt\n"
                      "srun bash -c 'echo node $SLURM_NODEID of $SLURM_JOB_NUM_NODES'\n")
    job = run(cluster, "sbatch", "--parsable", str(script)).stdout.strip()
    assert job.isdigit(), job
    wait_until(lambda: f"JobId={job} " in (cluster.jobcomp.read_text() if cluster.jobcomp.exists() else ""), 60,
               "jobcomp record")
    record = next(line for line in cluster.jobcomp.read_text().splitlines() if f"JobId={job} " in line)
    assert "JobState=COMPLETED" in record and "NodeCnt=2" in record, record
    assert sorted((tmp_path / f"out-{job}.txt").read_text().split("\n")[:2]) == ["node 0 of 2", "node 1 of 2"]

    pids = tmp_path / "pids"
    pids.mkdir()
    script.write_text(f"#!/bin/bash\n#SBATCH -N 2\n#SBATCH --output={tmp_path}/out-%j.txt\n"
                      f"srun bash -c 'echo $$ > {pids}/$SLURM_NODEID; exec sleep 600'\n")
    job = run(cluster, "sbatch", "--parsable", str(script)).stdout.strip()
    wait_until(lambda: len(list(pids.iterdir())) == 2, 60, "both tasks running")
    tasks = [int(p.read_text()) for p in pids.iterdir()]
    assert len(pids_alive(tasks)) == 2
    assert run(cluster, "scancel", job).returncode == 0
    wait_until(lambda: not pids_alive(tasks), 30, "the tasks to end")
    wait_until(lambda: "JobState=CANCELLED" in cluster.jobcomp.read_text(), 30, "the cancellation record")
