"""A private, real Slurm cluster for tests: munged, slurmctld and one slurmd per node, all in the foreground under
a scratch folder, on free ports and loopback addresses (127.0.0.21, .22, ...), as root, without systemd
(Debian's slurm-wlm and munge packages: `bash install/install-requirements.sh --env all --system`).

    cluster = SlurmCluster(tmp_path / "slurm", nodes=2)
    cluster.start()                     # ready when sinfo shows every node idle (~5-10 s)
    subprocess.run(["srun", "-N2", "hostname"], env=cluster.env)
    cluster.stop()                      # by the PIDs it started, never by name

Both nodes share this machine's hostname and file system. Job state after the end comes from the jobcomp file
(no accounting daemon here) or `scontrol show job` while Slurm keeps it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scancel", "scontrol")
MUNGE_KEY = Path("/etc/munge/munge.key")


def slurm_available() -> bool:
    """Root, Slurm's daemons and clients, and munge's key are here."""
    found = all(shutil.which(b) or Path(f"/usr/sbin/{b}").is_file() for b in SLURM_BINARIES)
    return found and MUNGE_KEY.is_file() and os.geteuid() == 0


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((addr, 0))
        return sock.getsockname()[1]


@dataclass
class SlurmCluster:
    root: Path
    nodes: int = 2
    cpus: int = 2
    first_address: int = 21
    """Node i listens on 127.0.0.(first_address + i)."""
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.jobcomp = self.root / "jobcomp.txt"
        self.node_names = [f"n{i + 1}" for i in range(self.nodes)]

    @property
    def env(self) -> dict[str, str]:
        """What a Slurm client needs to reach this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> None:
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-f", str(self.conf)])
            self._wait(lambda: self._run("scontrol", "ping").returncode == 0, timeout, "slurmctld to answer")
            for name in self.node_names:
                self._spawn(f"slurmd-{name}", [_binary("slurmd"), "-D", "-N", name, "-f", str(self.conf)])
            self._wait(self._all_idle, timeout, "every node to be idle")
        except BaseException:
            self.stop()
            raise

    def _start_munge(self) -> None:
        folder = self.socket.parent
        folder.mkdir(parents=True, exist_ok=True)
        self._spawn("munged", [_binary("munged"), "-F", "--force", f"--socket={self.socket}",
                               f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}",
                               f"--seed-file={folder / 'seed'}", f"--key-file={MUNGE_KEY}"])  # fmt: skip
        self._wait(self.socket.exists, 15, "munged's socket")

    def _write_conf(self) -> None:
        host = socket.gethostname()
        d = self.root
        (d / "spool").mkdir(exist_ok=True)
        (d / "state").mkdir(exist_ok=True)
        lines = [
            "ClusterName=fs", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}", "AuthType=auth/munge", f"AuthInfo=socket={self.socket}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "ReturnToService=2", f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"StateSaveLocation={d / 'state'}", f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d}/slurmd.%n.pid", f"SlurmctldLogFile={d / 'slurmctld.log'}",
            f"SlurmdLogFile={d}/slurmd.%n.log", "SlurmUser=root", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}", "MpiDefault=none", "SlurmctldTimeout=30", "SlurmdTimeout=30",
        ]  # fmt: skip
        for i, name in enumerate(self.node_names):
            addr = f"127.0.0.{self.first_address + i}"
            lines.append(f"NodeName={name} NodeAddr={addr} NodeHostname={host} Port={_free_port(addr)} "
                         f"CPUs={self.cpus} RealMemory=4000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.out", "wb")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))
        time.sleep(0.2)
        if self.procs[-1].poll() is not None:
            raise RuntimeError(f"{name} exited with {self.procs[-1].returncode}: "
                               f"{(self.root / f'{name}.out').read_text()[-2000:]}")

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([_binary(argv[0]), *argv[1:]], capture_output=True, text=True, env=self.env,
                              timeout=30)

    def _all_idle(self) -> bool:
        states = self._run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
        return states.count("idle") == self.nodes

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"waiting for {what}: {dead[0].args[0]} exited ({dead[0].returncode}); "
                                   f"logs in {self.root}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} within {timeout:.0f}s; logs in {self.root}")
            time.sleep(0.25)

    def _environs(self) -> list[tuple[int, int, list[bytes]]]:
        """(pid, parent pid, environment) of every process of this cluster: its daemons, and what they and its
        jobs started (all carry this cluster's SLURM_CONF; another cluster on the machine has its own)."""
        mine = f"SLURM_CONF={self.conf}".encode()
        found = []
        for name in filter(str.isdigit, os.listdir("/proc")):
            try:
                env = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
                parent = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            if mine in env:
                found.append((int(name), parent, env))
        return found

    def job_processes(self, job_id: str, node: str) -> list[int]:
        """The processes of a job's tasks on one node (their environment names both), and the slurmstepd that
        started them."""
        tasks = [(pid, parent) for pid, parent, env in self._environs()
                 if f"SLURM_JOB_ID={job_id}".encode() in env and f"SLURMD_NODENAME={node}".encode() in env]
        pids = {pid for pid, _ in tasks}
        steps = {parent for _, parent in tasks if parent not in pids and
                 Path(f"/proc/{parent}/cmdline").read_bytes().startswith(b"slurmstepd")}
        return sorted(pids | steps)

    def lose_node(self, node: str, job_id: str) -> list[int]:
        """The node dies: its slurmd, and the job's slurmstepd and tasks there, are SIGKILLed (what a power loss
        leaves Slurm to find out: the node stops answering). Returns the job's pids that were killed."""
        index = self.node_names.index(node)
        slurmd = self.procs[2 + index]
        victims = self.job_processes(job_id, node)
        os.killpg(slurmd.pid, signal.SIGKILL)
        slurmd.wait(timeout=10)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return victims

    def stop(self) -> None:
        """Stop the daemons it started, by PID, slurmd first; then whatever its jobs left (a job step whose slurmd
        is gone carries on by itself): the processes with this cluster's SLURM_CONF, by PID."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.procs.clear()
        for pid in self._leftover_steps():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _leftover_steps(self) -> list[int]:
        """This cluster's slurmstepd processes (started by its slurmd, so carrying its SLURM_CONF) and every
        process beneath them: what a job leaves running once its slurmd is gone."""
        children: dict[int, list[int]] = {}
        steps = []
        for pid, parent, _ in self._environs():
            children.setdefault(parent, []).append(pid)
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"slurmstepd"):
                    steps.append(pid)
            except OSError:
                continue
        found, todo = set(steps), list(steps)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return sorted(found)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """`python -m tests.helpers.slurm [--dir D] [--nodes N]`: start a private cluster, print its SLURM_CONF, keep
    it up until Ctrl-C or SIGTERM, then stop every daemon it started."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/flagscale-slurm"), help="scratch folder")
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args()
    if not slurm_available():
        raise SystemExit("needs root, slurm-wlm and munge: bash install/install-requirements.sh --env all --system")
    cluster = SlurmCluster(args.dir, nodes=args.nodes)
    cluster.start()
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"Slurm is up: nodes {', '.join(cluster.node_names)}, partition debug.\n"
          f"  export SLURM_CONF={cluster.conf}\nCtrl-C stops it.", flush=True)
    try:
        while all(p.poll() is None for p in cluster.procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
