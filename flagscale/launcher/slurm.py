"""The Slurm executor: a Plan becomes one batch job.

The runner plans per-node work as for SSH, with node0, node1, ... for hosts and placeholders for what only the
running job knows (`spec/plan.py`: the first node's address, a port free there). This module writes, beside the
per-node scripts (`node<i>.sh`, rendered as for SSH):

* `slurm-node.sh`: what srun starts once per node; $SLURM_NODEID picks that node's script and log;
* `sbatch.sh`: the #SBATCH header from experiment.runner.slurm, then the rendezvous (first node of
  $SLURM_JOB_NODELIST, its NodeAddr, a free port there; written to `slurm-job.env` in the log folder), then one
  srun step on every node (and experiment.cmds.after_stop as a second step once it ends).

`run` submits it (`sbatch --parsable`) and records the Slurm job id in job.json; state comes from squeue (also for
jobs that ended, while slurmctld keeps them), else sacct, else the jobcomp file; the exit status of each node from
the exit file its script writes; `stop` is scancel, then waiting until Slurm reports the job ended. Every command
runs here, on the login node, through the local transport; nodes are never reached directly.
"""

from __future__ import annotations

import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagscale.config.hostfile import LOCALHOST, Host
from flagscale.config.schema import RunnerConfig
from flagscale.exceptions import ConfigError, LaunchError
from flagscale.launcher.launcher import HostFacts, HostStatus, Launcher, StopResult
from flagscale.launcher.transport import CommandResult, SSHSettings, Transport
from flagscale.spec.plan import Plan, ProcessSpec, case_env, fill_runtime_values, render_script
from flagscale.spec.private import SCRIPT_MODE, private_dirs, write_private
from flagscale.spec.record import HostRecord, JobRecord, JobState, LauncherSettings, SlurmSettings

COMMANDS = ("sbatch", "srun", "squeue", "scancel", "sinfo", "scontrol")
PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED"}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
STOP_GRACE_S = 60.0
"""Beyond stop_timeout: how long `stop` waits for Slurm to report a cancelled job ended (KillWait is 30 s)."""
AFTER_STOP_S = 300.0
"""How long `stop` lets the batch script run experiment.cmds.after_stop on every node before cancelling it."""
_FREE_PORT = 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'


def settings_of(runner: RunnerConfig, exp_name: str, envs: dict[str, Any], exclude: tuple[str, ...] = (),
                shared: tuple[str, ...] = ()) -> SlurmSettings:
    """The batch job experiment.runner.slurm describes; `exclude`: nodes lost by an earlier launch; `shared`:
    folders a container must see at the same path (the experiment dir, the launching directory)."""
    slurm = runner.slurm
    args = [f"--job-name={exp_name}", f"--nodes={runner.nnodes or 1}", "--ntasks-per-node=1", "--no-requeue"]
    for option in ("partition", "account", "qos", "time", "gpus_per_node", "constraint", "reservation"):
        value = getattr(slurm, option)
        if value is not None:
            args.append(f"--{option.replace('_', '-')}={value}")
    args += ["--exclusive"] if slurm.exclusive else []
    args += slurm.extra_sbatch_args
    if exclude:  # joined with the config's own --exclude=, if it has one
        given = next((i for i, a in enumerate(args) if a.startswith("--exclude=")), None)
        if given is None:
            args.append(f"--exclude={','.join(exclude)}")
        else:
            args[given] = f"{args[given]},{','.join(exclude)}"
    for arg in args:
        if re.search(r"\s", arg):
            raise ConfigError(f"experiment.runner.slurm: '{arg}' holds white space, which an #SBATCH line cannot "
                              "carry; remove it")
    srun = []
    if slurm.container_image:
        mounts = [m for m in (slurm.container_mounts or "").split(",") if m] + [f"{d}:{d}" for d in shared]
        srun = [f"--container-image={slurm.container_image}", f"--container-mounts={','.join(mounts)}"]
    by_node = envs.get("node_specific") or {}
    node_env = {str(name): {str(k): "" if v is None else str(v) for k, v in (env or {}).items()}
                for name, env in by_node.items()}
    return SlurmSettings(sbatch_args=args, srun_args=srun, node_env=node_env)


@dataclass(slots=True, kw_only=True)
class SlurmJob:
    """What Slurm says of a job now."""

    job_id: str
    state: str
    """Slurm's own state name (PENDING, RUNNING, COMPLETED, CANCELLED, NODE_FAIL, ...), or UNKNOWN."""
    nodes: list[str] = field(default_factory=list)
    elapsed: str | None = None
    reason: str | None = None
    """Why it is pending, or how it ended (Slurm's reason / exit code)."""
    source: str = "squeue"
    """Where the answer came from: squeue, sacct or the jobcomp file."""

    @property
    def job_state(self) -> JobState:
        if self.state in PENDING:
            return JobState.PENDING
        if self.state in ENDED:
            return JobState.COMPLETED if self.state == "COMPLETED" else JobState.FAILED
        return JobState.UNKNOWN if self.state == "UNKNOWN" else JobState.RUNNING

    def line(self) -> str:
        """One line for query and test: `slurm job 12: RUNNING on n1,n2, elapsed 0:31`."""
        where = f" on {','.join(self.nodes)}" if self.nodes else ""
        elapsed = f", elapsed {self.elapsed}" if self.elapsed else ""
        reason = f" ({self.reason})" if self.reason and self.reason not in ("None", "(null)") else ""
        return f"slurm job {self.job_id}: {self.state}{reason}{where}{elapsed} (from {self.source})"


class SlurmLauncher(Launcher):
    """Submits a plan as one Slurm batch job and follows it through Slurm's commands, run on this machine."""

    def __init__(self, settings: LauncherSettings) -> None:
        super().__init__(ssh=SSHSettings(), python=settings.python, shared_fs=True)
        assert settings.slurm is not None
        self.slurm = settings.slurm
        self._jobs: dict[str, SlurmJob] = {}

    def transport(self, host: Host) -> Transport:
        """The login node (this machine) for every node: the job's files are on a file system all nodes share."""
        return super().transport(LOCALHOST)

    def _run(self, *argv: str, timeout: float = 60) -> CommandResult:
        return self.transport(LOCALHOST).run(list(argv), timeout=timeout)

    # before the launch: what can be checked without a job
    def connect_all(self, hosts: list[Host], master: Host, port: int | None, job_env: Any) -> HostFacts:
        """Slurm's commands are here, the partition exists and has the nodes; the devices of nodes not yet
        allocated are unknown (no cap), and the rendezvous port is chosen inside the job unless configured."""
        missing = [c for c in COMMANDS if shutil.which(c) is None]
        if missing:
            raise LaunchError(f"Slurm's {', '.join(missing)} not found on this machine; run FlagScale on a login node "
                              "of the cluster (Debian/Ubuntu: apt-get install slurm-client)")
        self._check_partition(len(hosts))
        if any(a.startswith("--container-image") for a in self.slurm.srun_args):
            self._check_pyxis()
        return HostFacts(port=port, devices={h: None for h in hosts})

    def _check_partition(self, nodes: int) -> None:
        answer = self._run("sinfo", "-h", "-o", "%P|%D")
        if answer.returncode != 0:
            raise LaunchError(f"sinfo failed: {_last_line(answer)}; is slurmctld reachable (SLURM_CONF)?")
        sizes: dict[str, int] = {}
        default = None
        for line in answer.stdout.split():
            name, _, count = line.partition("|")
            if name.endswith("*"):
                name = default = name[:-1]
            sizes[name] = sizes.get(name, 0) + int(count or 0)
        wanted = next((a.split("=", 1)[1] for a in self.slurm.sbatch_args if a.startswith("--partition=")), default)
        if wanted is None:
            raise LaunchError("the cluster has no default partition; set experiment.runner.slurm.partition "
                              f"(partitions: {', '.join(sizes) or 'none'})")
        if wanted not in sizes:
            raise LaunchError(f"experiment.runner.slurm.partition '{wanted}' does not exist (sinfo lists: "
                              f"{', '.join(sizes) or 'none'})")
        excluded = [n for a in self.slurm.sbatch_args if a.startswith("--exclude=") for n in a[10:].split(",")]
        usable = sizes[wanted] - len(excluded)
        if nodes > usable:
            without = f" without the excluded {', '.join(excluded)}" if excluded else ""
            raise LaunchError(f"the job needs {nodes} node(s) but partition '{wanted}' has {usable}{without}; lower "
                              "experiment.runner.nnodes (runner.slurm.nodes) or pick another partition")

    def _check_pyxis(self) -> None:
        help_text = self._run("srun", "--help").stdout
        if "--container-image" not in help_text:
            raise LaunchError("experiment.runner.slurm.container_image needs the pyxis plugin, and this cluster's "
                              "srun has no --container-image (srun --help); remove container_image or install pyxis")

    def check_ports(self, plan: Plan) -> None:
        """The nodes are not known before the job starts: a taken port shows in the node's log."""

    # the launch
    def write_scripts(self, plan: Plan) -> list[str]:
        """The per-node scripts, the node entry script and the batch script (the last path)."""
        private_dirs(plan.log_dir, plan.scripts_dir)
        late = case_env("SLURMD_NODENAME", self.slurm.node_env, "experiment.envs.node_specific, by Slurm node name")
        paths = []
        for spec in plan.processes:
            paths.append(plan.script_path(spec))
            write_private(paths[-1], render_script(plan, spec, late), SCRIPT_MODE)
        for path, text in ((node_entry_path(plan), render_node_entry(plan)),
                           (batch_path(plan), render_batch(plan, self.slurm, self.python))):
            write_private(path, text, SCRIPT_MODE)
            paths.append(path)
        return paths

    def submit_command(self, plan: Plan) -> list[str]:
        return ["sbatch", "--parsable", batch_path(plan)]

    def launch(self, plan: Plan, record_base: dict[str, Any]) -> JobRecord:
        """Write the scripts, submit the batch job and save the record naming it."""
        self.write_scripts(plan)
        answer = self._run(*self.submit_command(plan))
        job_id = answer.stdout.strip().split(";")[0]
        if answer.returncode != 0 or not job_id.isdigit():
            raise LaunchError(f"sbatch refused the job: {_last_line(answer)} (batch script {batch_path(plan)})")
        record = JobRecord(hosts=[_node_record(plan, spec) for spec in plan.processes], **record_base)
        record.info["slurm"] = {"job_id": job_id, "batch_script": batch_path(plan),
                                "output": str(Path(plan.log_dir) / f"slurm-{job_id}.out")}
        try:
            record.save()
        except BaseException:
            self._run("scancel", job_id)
            raise
        return record

    # following the job
    def job(self, record: JobRecord) -> SlurmJob:
        """What Slurm says of the recorded job: squeue (also for jobs that ended, while slurmctld keeps them),
        else sacct (accounting), else the jobcomp file."""
        job_id = record.info["slurm"]["job_id"]
        found = self._from_squeue(job_id) or self._from_sacct(job_id) or self._from_jobcomp(job_id)
        found = found or SlurmJob(job_id=job_id, state="UNKNOWN", source="no Slurm record")
        if not found.nodes:
            found.nodes = self._allocated_nodes(record)
        self._jobs[job_id] = found
        return found

    def scheduler(self, record: JobRecord) -> SlurmJob:
        """The job as the last look saw it (asked now if it was not looked at yet)."""
        return self._jobs.get(record.info["slurm"]["job_id"]) or self.job(record)

    def _from_squeue(self, job_id: str) -> SlurmJob | None:
        answer = self._run("squeue", "-h", "--states=all", "-j", job_id, "-o", "%T|%N|%M|%r")
        if answer.returncode != 0:
            if "Invalid job id" in answer.stderr:
                return None
            raise LaunchError(f"squeue failed: {_last_line(answer)}; is slurmctld reachable (SLURM_CONF)?")
        line = answer.stdout.strip().splitlines()[:1]
        if not line:
            return None
        state, nodes, elapsed, reason = (line[0].split("|") + ["", "", ""])[:4]
        return SlurmJob(job_id=job_id, state=state, nodes=self._hostnames(nodes), elapsed=elapsed or None,
                        reason=reason or None)

    def _from_sacct(self, job_id: str) -> SlurmJob | None:
        answer = self._run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,NodeList,Elapsed,ExitCode")
        line = answer.stdout.strip().splitlines()[:1] if answer.returncode == 0 else []
        if not line:
            return None
        state, nodes, elapsed, code = (line[0].split("|") + ["", "", ""])[:4]
        return SlurmJob(job_id=job_id, state=state.split()[0], nodes=self._hostnames(nodes), elapsed=elapsed,
                        reason=f"exit code {code}", source="sacct")

    def _from_jobcomp(self, job_id: str) -> SlurmJob | None:
        config = dict(re.findall(r"^(\w+)\s*=\s*(.*?)\s*$", self._run("scontrol", "show", "config").stdout, re.M))
        if config.get("JobCompType") != "jobcomp/filetxt" or not config.get("JobCompLoc"):
            return None
        text = self.transport(LOCALHOST).read_text(config["JobCompLoc"]) or ""
        line = next((entry for entry in reversed(text.splitlines()) if f"JobId={job_id} " in entry), None)
        if line is None:
            return None
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        return SlurmJob(job_id=job_id, state=fields.get("JobState", "UNKNOWN"),
                        nodes=self._hostnames(fields.get("NodeList", "")), reason=f"exit code {fields.get('ExitCode')}",
                        source="jobcomp")

    def _hostnames(self, nodelist: str) -> list[str]:
        if not nodelist or nodelist in ("(null)", "None assigned"):
            return []
        if not re.search(r"[\[\]]", nodelist):
            return nodelist.split(",")
        answer = self._run("scontrol", "show", "hostnames", nodelist)
        return answer.stdout.split() if answer.returncode == 0 else [nodelist]

    def _allocated_nodes(self, record: JobRecord) -> list[str]:
        """The nodes the batch script wrote down when the job started (SLURM_NODEID order)."""
        return job_env(self, record).get("FLAGSCALE_NODES", "").split()

    def status(self, record: JobRecord) -> list[HostStatus]:
        """Each node's state: Slurm's for the job, the node's own exit file once its script ended."""
        try:
            job = self.job(record)
        except LaunchError as err:
            return [HostStatus(host=h.host, state=JobState.UNKNOWN, error=str(err)) for h in record.hosts]
        lost = self._lost_nodes(job.nodes) if job.job_state is not JobState.PENDING else {}
        return [self._node_status(record, job, index, lost) for index in range(len(record.hosts))]

    def state_of(self, record: JobRecord, statuses: list[HostStatus]) -> JobState:
        """Slurm's word while the job is in its hands (queued, running, tearing a failed step down); once it ended,
        the nodes' states (completed, failed, stopped)."""
        job = self.scheduler(record)
        if job.job_state in (JobState.PENDING, JobState.RUNNING):
            return job.job_state
        return super().state_of(record, statuses)

    def _lost_nodes(self, nodes: list[str]) -> dict[str, str]:
        """The job's nodes Slurm reports lost (not responding, down or failed), with its state and reason."""
        answer = self._run("sinfo", "-h", "-N", "-n", ",".join(nodes), "-o", "%N|%T|%E") if nodes else None
        lost = {}
        for line in answer.stdout.splitlines() if answer is not None and answer.returncode == 0 else []:
            name, state, reason = (line.split("|") + ["", ""])[:3]
            if state.endswith("*") or state.split("+")[0] in ("down", "fail", "failing"):
                why = f" ({reason})" if reason not in ("", "none") else ""
                lost[name] = f"Slurm reports node {name} {state}{why}"
        return lost

    def _node_status(self, record: JobRecord, job: SlurmJob, index: int, lost: dict[str, str]) -> HostStatus:
        host_record = record.hosts[index]
        name = job.nodes[index] if index < len(job.nodes) else None
        if name and name != host_record.host.name:  # the record names the node Slurm picked from now on
            host_record.host = Host(name=name, slots=host_record.host.slots, type=host_record.host.type)
        host = host_record.host
        code = _exit_code(self.transport(LOCALHOST).read_text(host_record.exit_file))
        stopped = host_record.stopped_at is not None or record.stop_requested_at is not None
        slurm_state = job.job_state
        if slurm_state in (JobState.PENDING, JobState.UNKNOWN):
            state = slurm_state
        elif code is not None:
            state = JobState.COMPLETED if code == 0 else JobState.STOPPED if stopped else JobState.FAILED
        elif slurm_state is JobState.RUNNING:
            state = JobState.RUNNING
        else:  # the job ended and this node's script did not end by itself
            state = JobState.STOPPED if stopped else JobState.FAILED
        return HostStatus(host=host, state=state, exit_code=code, error=lost.get(host.name))

    def stop(self, record: JobRecord, timeout: float = 15) -> list[StopResult]:
        """scancel, then wait until Slurm reports the job ended (its tasks gone). With experiment.cmds.after_stop,
        the main step is cancelled first so that the batch script runs after_stop on every node."""
        record.mark_stop_requested()
        job_id = record.info["slurm"]["job_id"]
        was_running = [s.state is JobState.RUNNING and h.stopped_at is None
                       for s, h in zip(self.status(record), record.hosts)]
        job = self.scheduler(record)
        error = None
        if job.state not in ENDED:
            if record.after_stop and job.state == "RUNNING":
                self._run("scancel", f"{job_id}.0")
                self._wait_ended(record, timeout + AFTER_STOP_S)
            if self.job(record).state not in ENDED:
                cancelled = self._run("scancel", job_id)
                if cancelled.returncode != 0:
                    error = f"scancel {job_id} failed: {_last_line(cancelled)}"
            if error is None and not self._wait_ended(record, timeout + STOP_GRACE_S):
                error = f"Slurm still reports job {job_id} {self.scheduler(record).state}; run stop again"
        results = []
        for host_record, running in zip(record.hosts, was_running):
            if error is None:
                host_record.stopped_at = host_record.stopped_at or time.time()
            results.append(StopResult(host=host_record.host, found=int(running), error=error))
        return results

    def _wait_ended(self, record: JobRecord, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.job(record).state not in ENDED:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def stacks(self, record: JobRecord) -> tuple[list[str], list[str]]:
        return [], [f"stack dumps are not taken on Slurm nodes yet (job {record.info['slurm']['job_id']})"]

    def read_text(self, record: JobRecord, path: str) -> str | None:
        return self.transport(LOCALHOST).read_text(path)

    def collect_logs(self, record: JobRecord) -> list[str]:
        return []

    def resolve(self, record: JobRecord, text: str) -> str | None:
        """`text` with the job's run-time values (first node's address, port) filled in; None before it runs."""
        return fill_runtime_values(text, job_env(self, record))


def job_env(launcher: Launcher, record: JobRecord) -> dict[str, str]:
    """What the batch script wrote to <log dir>/slurm-job.env when the job started (empty before)."""
    text = launcher.transport(LOCALHOST).read_text(str(Path(record.log_dir) / "slurm-job.env")) or ""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _node_record(plan: Plan, spec: ProcessSpec) -> HostRecord:
    """A node's part of the record: no process group here (Slurm tracks the tasks), its log and exit file."""
    return HostRecord(host=spec.host, node_rank=spec.node_rank, pgid=None, script=plan.script_path(spec),
                      log_path=spec.log_path, exit_file=spec.exit_file, started_at=time.time())


def _exit_code(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text else None
    except ValueError:
        return None


def _last_line(answer: CommandResult) -> str:
    lines = (answer.stderr.strip() or answer.stdout.strip() or f"exit status {answer.returncode}").splitlines()
    return lines[-1]


def batch_path(plan: Plan) -> str:
    return str(Path(plan.scripts_dir) / "sbatch.sh")


def node_entry_path(plan: Plan) -> str:
    return str(Path(plan.scripts_dir) / "slurm-node.sh")


def render_node_entry(plan: Plan) -> str:
    """What srun starts on every node: that node's script (by $SLURM_NODEID), its output into its log."""
    q = shlex.quote
    lines = ["#!/usr/bin/env bash",
             f"# FlagScale {plan.task_type} job {plan.run_id}: srun starts this once per node",
             'case "${SLURM_NODEID:-}" in']
    for spec in plan.processes:
        lines.append(f"  {spec.node_rank}) script={q(plan.script_path(spec))}; log={q(spec.log_path)} ;;")
    lines += ['  *) echo "FlagScale: no script for SLURM_NODEID=${SLURM_NODEID:-unset}" >&2; exit 2 ;;', "esac",
              'mkdir -p "$(dirname "$log")"',
              "# the node's script in a session of its own; this task ends only once everything in that session has",
              "# (torchrun finishing its workers after a cancel): Slurm tracks this task, not orphans it would leave",
              'setsid bash "$script" > "$log" 2>&1 &',
              "child=$!",
              "trap 'kill -TERM -- -\"$child\" 2>/dev/null' TERM INT",
              'wait "$child"; status=$?',
              'if kill -0 "$child" 2>/dev/null; then wait "$child"; status=$?; fi  # a signal ended the first wait',
              'while [ -n "$(ps -o pid= -s "$child")" ]; do sleep 0.2; done',
              'exit "$status"']
    return "\n".join(lines) + "\n"


def render_batch(plan: Plan, slurm: SlurmSettings, python: str) -> str:
    """The batch script: #SBATCH header, the rendezvous, one srun step on every node, then after_stop."""
    q = shlex.quote
    output = str(Path(plan.log_dir) / "slurm-%j.out")
    header = [f"#SBATCH {arg}" for arg in [*slurm.sbatch_args, f"--output={output}"]]
    step = 'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1'
    port = (f"export FLAGSCALE_MASTER_PORT={plan.master_port}" if plan.master_port is not None else
            f'FLAGSCALE_MASTER_PORT=$("$python" -S -c {q(_FREE_PORT)}); export FLAGSCALE_MASTER_PORT')
    lines = [
        "#!/usr/bin/env bash", *header,
        f"# FlagScale {plan.task_type} job {plan.run_id} on Slurm (submit: sbatch {q(batch_path(plan))})",
        "set -uo pipefail",
        f"python={q(python)}",
        f"log_dir={q(plan.log_dir)}",
        'nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'first=$(head -n 1 <<< "$nodes")',
        "# the rendezvous: the first node's address as Slurm reaches it, and a port free there",
        'addr=$(scontrol show node "$first" | sed -n \'s/.*NodeAddr=\\([^ ]*\\).*/\\1/p\' | head -n 1)',
        'export FLAGSCALE_MASTER_ADDR="${addr:-$first}"',
        port,
        "umask 077",
        "{",
        '  echo "FLAGSCALE_MASTER_ADDR=$FLAGSCALE_MASTER_ADDR"',
        '  echo "FLAGSCALE_MASTER_PORT=$FLAGSCALE_MASTER_PORT"',
        '  echo "FLAGSCALE_NODES="$nodes',
        '} > "$log_dir/slurm-job.env"',
        'echo "FlagScale: job $SLURM_JOB_ID on" $nodes", rendezvous $FLAGSCALE_MASTER_ADDR:$FLAGSCALE_MASTER_PORT"',
        " ".join([step, "--kill-on-bad-exit=1", *map(q, slurm.srun_args), "bash", q(node_entry_path(plan))]),
        "status=$?",
    ]
    if plan.after_stop:
        lines += ["# experiment.cmds.after_stop, on every node, once the job's step has ended",
                  f"{step} bash -c {q(chr(10).join(plan.after_stop))}"]
    return "\n".join([*lines, 'exit "$status"']) + "\n"
