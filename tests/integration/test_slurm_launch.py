"""The tiny GPT on a real Slurm cluster (tests/helpers/slurm.py: munged, slurmctld and three slurmd nodes on this
machine) through run.py with experiment.runner.type=slurm: trains on 2 nodes x 1 process with action=test; run,
query and stop (Slurm reports CANCELLED, no task left); a job failing on one node names that node and its log; a
node lost mid-run is reported and, with max_restarts, the job is resubmitted excluding it and completes. Also: the
sbatch option table in flagscale/config/data/ is the installed sbatch's."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flagscale.config.sbatch import options, parse_help
from flagscale.launcher.launcher import Launcher
from flagscale.launcher.slurm import ENDED
from flagscale.spec.record import load_record
from tests.conftest import REPO, pids_alive, tiny_overrides
from tests.helpers.requires import requirement
from tests.helpers.slurm import SlurmCluster, slurm_available
from tests.integration.test_convert import tiny_hf_model
from tools.compat.extract_sbatch_options import sbatch_help

pytestmark = pytest.mark.integration
_slurm = requirement(slurm_available(), "needs root, slurm-wlm and munge (bash install/install-requirements.sh "
                                        "--env all --system)")
SLURM_CONF = ("--config-path", str(REPO / "examples/tiny_gpt/conf"), "--config-name", "train_slurm")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    started = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=3, first_address=41)
    started.start()
    try:
        yield started
    finally:
        started.stop()


def run(cluster: SlurmCluster, exp: Path, data: Path, action: str, *extra: str, timeout: float = 300,
        iters: int = 30) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(REPO / "run.py"), *SLURM_CONF, f"action={action}",
            *tiny_overrides(data, exp, train_iters=iters, eval_interval=iters, eval_iters=1),
            f"train.system.checkpoint.save_interval={iters}", "train.system.logging.log_interval=5", *extra]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=cluster.env)


def losses(exp: Path) -> list[float]:
    events = [json.loads(line) for m in sorted(exp.glob("logs/*/metrics.jsonl")) for line in m.read_text().split("\n")
              if line.strip()]
    return [e["loss"] for e in events if e["event"] == "train"]


def jobcomp(cluster: SlurmCluster, job_id: str) -> str:
    text = cluster.jobcomp.read_text() if cluster.jobcomp.exists() else ""
    return next((line for line in text.splitlines() if f"JobId={job_id} " in line), "")


def record(exp: Path) -> dict:
    return json.loads((exp / "job.json").read_text())


def nodes_of(exp: Path) -> list[str]:
    """The nodes the job's batch script wrote down (SLURM_NODEID order): Slurm picks them, e.g. n2,n3 while n1 is
    still completing the previous test's job."""
    env_file = Path(record(exp)["log_dir"]) / "slurm-job.env"
    wait_until(env_file.is_file, 60, "the job's slurm-job.env")
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    return env["FLAGSCALE_NODES"].split()


def describe(pids: list[int]) -> str:
    """What the processes still alive among `pids` are (for a failure message)."""
    def name(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
        except OSError:
            return "?"
    return "; ".join(f"{pid}: {name(pid)}" for pid in pids_alive(pids)) or "none"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f}s"
        time.sleep(0.5)


def test_the_sbatch_option_table_is_the_installed_sbatch_s() -> None:
    text, version = sbatch_help()
    live = parse_help(text)
    assert live["long"] == options()["long"] and live["short"] == options()["short"], (
        "flagscale/config/data/sbatch_options.json is not this sbatch's; run tools/compat/extract_sbatch_options.py")
    assert version.split()[-1] in options()["source"]


def test_tiny_gpt_trains_on_two_slurm_nodes(cluster: SlurmCluster, tiny_data: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    done = run(cluster, exp, tiny_data, "test")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    job_id = record(exp)["info"]["slurm"]["job_id"]
    nodes = nodes_of(exp)
    assert len(nodes) == 2 and f"slurm job {job_id}: RUNNING on {','.join(nodes)}" in done.stdout
    assert "COMPLETED" in done.stdout
    trained = losses(exp)
    assert len(trained) == 6 and trained[-1] < trained[0] - 1.0, trained
    assert (exp / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert "JobState=COMPLETED" in jobcomp(cluster, job_id) and "NodeCnt=2" in jobcomp(cluster, job_id)
    log_dir = Path(record(exp)["log_dir"])
    # one rank per node, the two ranks on two nodes: torchrun wrote each node's ranks under its own folder
    assert sorted(p.name for p in (log_dir / "torchrun").iterdir()) == ["node0", "node1"]
    env = dict(line.split("=", 1) for line in (log_dir / "slurm-job.env").read_text().splitlines())
    first = 41 + cluster.node_names.index(nodes[0])
    assert env["FLAGSCALE_MASTER_ADDR"] == f"127.0.0.{first}"  # the first node's NodeAddr


def test_run_query_stop_leaves_nothing_and_slurm_says_cancelled(cluster: SlurmCluster, tiny_data: Path,
                                                                tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    started = run(cluster, exp, tiny_data, "run", iters=3000)
    assert started.returncode == 0, started.stdout + started.stderr
    job_id = record(exp)["info"]["slurm"]["job_id"]
    assert f"submitted train job {record(exp)['run_id']} as Slurm job {job_id} (2 node(s))" in started.stdout
    wait_until(lambda: len(losses(exp)) >= 2, 120, "two logged iterations")
    nodes = nodes_of(exp)
    tasks = [pid for node in nodes for pid in cluster.job_processes(job_id, node)]
    assert tasks
    now = run(cluster, exp, tiny_data, "query", iters=3000)
    assert now.returncode == 0, now.stdout + now.stderr
    assert f"slurm job {job_id}: RUNNING on {','.join(nodes)}" in now.stdout and "progress: iteration" in now.stdout
    assert now.stdout.count("RUNNING") >= 3  # the job and both nodes
    stopped = run(cluster, exp, tiny_data, "stop", iters=3000)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    # Slurm reported the job ended. This cluster tracks tasks by parent pid (proctrack/linuxproc, no cgroups here):
    # a rank's data-loader workers, orphaned when their rank ends, leave by themselves within torch's 5 s check of
    # their parent; with proctrack/cgroup (real clusters) Slurm ends them itself.
    wait_until(lambda: not pids_alive(tasks), 30, f"the job's tasks to be gone ({describe(tasks)})")
    assert "JobState=CANCELLED" in jobcomp(cluster, job_id)
    after = run(cluster, exp, tiny_data, "query", iters=3000)
    assert "STOPPED" in after.stdout and f"slurm job {job_id}: CANCELLED" in after.stdout, after.stdout
    again = run(cluster, exp, tiny_data, "stop", iters=3000)
    assert "already stopped; nothing to do" in again.stdout


def test_after_stop_runs_on_every_node_when_the_job_is_stopped(cluster: SlurmCluster, tiny_data: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exp, marks = tmp_path / "exp", tmp_path / "marks"
    marks.mkdir()
    after = f"+experiment.cmds.after_stop='touch {marks}/$SLURMD_NODENAME'"
    started = run(cluster, exp, tiny_data, "run", after, iters=3000)
    assert started.returncode == 0, started.stdout + started.stderr
    wait_until(lambda: len(losses(exp)) >= 1, 120, "a logged iteration")
    nodes = nodes_of(exp)
    stopped = run(cluster, exp, tiny_data, "stop", after, iters=3000)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert sorted(p.name for p in marks.iterdir()) == sorted(nodes)  # after_stop ran once on each node
    after_query = run(cluster, exp, tiny_data, "query", iters=3000)
    assert "STOPPED" in after_query.stdout, after_query.stdout
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    launcher = Launcher.from_settings(load_record(exp).settings)
    job_id = record(exp)["info"]["slurm"]["job_id"]
    from_jobcomp = launcher._from_jobcomp(job_id)  # what query falls back on once squeue forgot the job
    assert from_jobcomp is not None and from_jobcomp.state in ENDED and from_jobcomp.nodes == nodes


def test_a_job_failing_on_one_node_names_it_and_its_log(cluster: SlurmCluster, tiny_data: Path,
                                                        tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    fail = "+experiment.cmds.before_start='test $SLURM_NODEID != 1 || { echo no data on $SLURMD_NODENAME; false; }'"
    done = run(cluster, exp, tiny_data, "test", fail)
    assert done.returncode != 0, done.stdout
    second = nodes_of(exp)[1]  # the node with SLURM_NODEID 1
    assert f"host {second} failed (exit 1)" in done.stdout and f"no data on {second}" in done.stdout, done.stdout
    job_id = record(exp)["info"]["slurm"]["job_id"]
    assert "JobState=FAILED" in jobcomp(cluster, job_id)
    now = run(cluster, exp, tiny_data, "query")
    assert now.returncode == 1
    assert f"slurm job {job_id}: FAILED" in now.stdout
    assert f"diagnosis: host {second} exited with code 1" in now.stdout
    assert f"no data on {second}" in now.stdout, now.stdout


def test_unknown_partition_and_too_many_nodes_are_one_line(cluster: SlurmCluster, tiny_data: Path,
                                                           tmp_path: Path) -> None:
    done = run(cluster, tmp_path / "a", tiny_data, "run", "experiment.runner.slurm.partition=gpu")
    assert done.returncode != 0 and "partition 'gpu' does not exist (sinfo lists: debug)" in done.stderr + done.stdout
    done = run(cluster, tmp_path / "b", tiny_data, "run", "experiment.runner.nnodes=4",
               "train.model.global_batch_size=16", "train.model.micro_batch_size=4")
    assert done.returncode != 0 and "needs 4 node(s) but partition 'debug' has 3" in done.stderr + done.stdout
    assert not (tmp_path / "a" / "job.json").exists() and not (tmp_path / "b" / "job.json").exists()


@pytest.mark.slow
def test_a_lost_node_is_reported_and_the_job_resubmitted_without_it(cluster: SlurmCluster, tiny_data: Path,
                                                                     tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    argv = [sys.executable, str(REPO / "run.py"), *SLURM_CONF, "action=test",
            *tiny_overrides(tiny_data, exp, train_iters=60, eval_interval=1000, eval_iters=1),
            "train.system.checkpoint.save_interval=10", "train.system.logging.log_interval=1",
            "++experiment.runner.max_restarts=1", "++experiment.runner.restart_backoff=1"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=cluster.env)
    try:
        wait_until(lambda: len(losses(exp)) >= 15, 180, "15 iterations")
        first = record(exp)
        job_id = first["info"]["slurm"]["job_id"]
        lost = nodes_of(exp)[1]
        assert cluster.lose_node(lost, job_id), f"no process of the job on {lost}"
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert f"Slurm reports node {lost}" in out and f"without host {lost}" in out, out[-6000:]
    second = record(exp)
    assert second["run_id"] != first["run_id"]
    batch = Path(second["info"]["slurm"]["batch_script"]).read_text()
    assert f"#SBATCH --exclude={lost}" in batch
    env = dict(line.split("=", 1) for line in (Path(second["log_dir"]) / "slurm-job.env").read_text().splitlines())
    assert env["FLAGSCALE_NODES"].split() == [n for n in cluster.node_names if n != lost]
    assert max(int(i) for i in (exp / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().split()) == 60
    events = [json.loads(line) for line in Path(second["info"]["supervisor"]["events"]).read_text().splitlines()]
    failed = [e for e in events if e["event"] == "failed"]
    assert failed and failed[0]["kind"] == "host lost" and failed[0]["restart"], failed


@pytest.mark.slow
def test_the_tiny_model_is_served_as_a_slurm_job(cluster: SlurmCluster, tiny_data: Path, tmp_path_factory,
                                                 tmp_path: Path) -> None:
    from openai import OpenAI

    from tests.helpers.requires import need

    need(importlib.util.find_spec("vllm") is not None, "vLLM is not installed (install-requirements.sh --env all)")
    model = tiny_hf_model(tmp_path_factory, tiny_data)
    exp = tmp_path / "exp"
    argv = [sys.executable, str(REPO / "run.py"), "--config-path", str(REPO / "examples/tiny_gpt/conf"),
            "--config-name", "serve", f"experiment.exp_dir={exp}", "+experiment.runner.type=slurm",
            f"serve.0.engine_args.model={model}", "~serve.0.engine_args.host", "serve.0.engine_args.port=18431"]
    started = subprocess.run([*argv, "action=run"], cwd=REPO, capture_output=True, text=True, timeout=400,
                             env=cluster.env)
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        url = record(exp)["info"]["urls"]["tiny_gpt"]
        (node,) = nodes_of(exp)
        assert url == f"http://127.0.0.{41 + cluster.node_names.index(node)}:18431/v1"  # the node's own address
        assert f"serving tiny_gpt: {url}" in started.stdout
        answer = OpenAI(base_url=url, api_key="none").completions.create(
            model="tiny_gpt", prompt="Once upon a time", max_tokens=8, temperature=0)
        assert answer.choices[0].text.strip() and answer.usage.completion_tokens == 8
        job_id = record(exp)["info"]["slurm"]["job_id"]
        tasks = cluster.job_processes(job_id, node)
        assert tasks
    finally:
        stopped = subprocess.run([*argv, "action=stop"], cwd=REPO, capture_output=True, text=True, timeout=120,
                                 env=cluster.env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    wait_until(lambda: not pids_alive(tasks), 30, "the server's processes to be gone")
    assert "JobState=CANCELLED" in jobcomp(cluster, job_id)


@pytest.mark.slow
def test_auto_tune_trials_are_slurm_jobs(cluster: SlurmCluster, tiny_data: Path, tmp_path: Path) -> None:
    exp = tmp_path / "tune"
    argv = [sys.executable, str(REPO / "run.py"), "--config-path", str(REPO / "examples/tiny_gpt/conf"),
            "--config-name", "auto_tune", *tiny_overrides(tiny_data, exp), "+experiment.runner.type=slurm",
            "experiment.runner.nnodes=2", "experiment.runner.nproc_per_node=1",
            "+experiment.envs.GLOO_SOCKET_IFNAME=lo", "experiment.auto_tuner.space.micro_batch_size=[2,4]",
            "experiment.auto_tuner.space.recompute_granularity=[null]",
            "experiment.auto_tuner.control.max_trials=2", "experiment.auto_tuner.control.iterations=8",
            "experiment.auto_tuner.control.warmup_iterations=2"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, env=cluster.env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = (exp / "auto_tuner" / "history.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(",ok," in row for row in rows), rows
    for trial in (1, 2):
        job_id = record(exp / "auto_tuner" / f"trial_{trial}")["info"]["slurm"]["job_id"]
        line = jobcomp(cluster, job_id)
        assert "JobState=COMPLETED" in line and f"Name=tiny_gpt_tune-trial{trial} " in line and "NodeCnt=2" in line
    assert "type: slurm" in (exp / "auto_tuner" / "best.yaml").read_text()
