"""Two test hosts in network namespaces the test creates: each has only `lo` and one end of a veth
pair carrying the test's own 10.250.N.1/24 and 10.250.N.2/24, so a program that binds all interfaces
(Ray) listens only there, and nothing can reach this machine's real interfaces or beyond (the
namespaces have no other link and no route). Each namespace runs its own sshd on its address.
Processes started with `exec_argv(...)` live in that namespace; the PID namespace is shared, so
/proc-based process control works as for any host.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.sshd import SSHD, SSHCluster, SSHServer

IP = shutil.which("ip") or "/usr/sbin/ip"


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)


def netns_unavailable() -> str | None:
    """None when namespaces and veth pairs can be made here, else the command and its error."""
    if os.geteuid() != 0 or not Path(IP).is_file() or not Path(SSHD).is_file():
        return "needs root, iproute2 (ip) and openssh-server"
    probe = f"fsprobe{os.getpid()}"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"'ip netns add {probe}' failed: {made.stderr.strip()}"
    try:
        veth = _ip("link", "add", f"{probe[:10]}a", "netns", probe, "type", "veth", "peer", "name", f"{probe[:10]}b",
                   "netns", probe)
        if veth.returncode != 0:
            return f"'ip link add ... type veth' failed: {veth.stderr.strip()}"
    finally:
        _ip("netns", "del", probe)
    return None


@dataclass
class NetnsHosts:
    """Namespaces `<tag>a`, `<tag>b` joined by one veth pair on 10.250.`subnet`.0/24."""

    ssh: SSHCluster
    subnet: int = 77
    tag: str = field(default_factory=lambda: f"fsn{os.getpid() % 100000}")
    servers: list[SSHServer] = field(default_factory=list)
    made: list[str] = field(default_factory=list)

    @property
    def namespaces(self) -> tuple[str, str]:
        return f"{self.tag}a", f"{self.tag}b"

    @property
    def addresses(self) -> tuple[str, str]:
        return f"10.250.{self.subnet}.1", f"10.250.{self.subnet}.2"

    def exec_argv(self, index: int, argv: list[str]) -> list[str]:
        """`argv` run inside namespace `index` (0 or 1)."""
        return [IP, "netns", "exec", self.namespaces[index], *argv]

    def create(self) -> None:
        """Namespaces, veth pair, addresses, links up, and one sshd in each."""
        for ns in self.namespaces:
            self._check(_ip("netns", "add", ns))
            self.made.append(ns)
            self._check(_ip("-n", ns, "link", "set", "lo", "up"))
        ends = (f"{self.tag}va", f"{self.tag}vb")
        self._check(_ip("link", "add", ends[0], "netns", self.namespaces[0], "type", "veth", "peer", "name", ends[1],
                        "netns", self.namespaces[1]))
        for ns, end, addr in zip(self.namespaces, ends, self.addresses):
            self._check(_ip("-n", ns, "addr", "add", f"{addr}/24", "dev", end))
            self._check(_ip("-n", ns, "link", "set", end, "up"))
        for index, addr in enumerate(self.addresses):
            self.servers.append(self._start_sshd(index, addr, 2222))

    def hostfile(self, path: Path, slots: int = 1) -> Path:
        path.write_text("".join(f"{s.addr} slots={slots} port={s.port}\n" for s in self.servers))
        return path

    def pids(self, index: int) -> list[int]:
        """Every process whose network namespace is namespace `index`."""
        out = _ip("netns", "pids", self.namespaces[index]).stdout.split()
        return [int(p) for p in out if p.isdigit()]

    def destroy(self) -> None:
        for server in self.servers:
            server.stop()
        for index in range(len(self.made)):  # anything a failed test left inside
            for pid in self.pids(index):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for ns in self.made:
            _ip("netns", "del", ns)
        self.made.clear()

    def _check(self, result: subprocess.CompletedProcess) -> None:
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(result.args)} failed: {result.stderr.strip()}")

    def _start_sshd(self, index: int, addr: str, port: int) -> SSHServer:
        etc, ns = self.ssh.etc, self.namespaces[index]
        config = etc / f"sshd_{ns}.conf"
        config.write_text(
            f"Port {port}\nListenAddress {addr}\nHostKey {etc / 'host_key'}\nPidFile {etc / f'sshd_{ns}.pid'}\n"
            f"AuthorizedKeysFile {etc / 'authorized_keys'}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
            "Subsystem sftp internal-sftp\nMaxStartups 100:30:200\nMaxSessions 100\nLogLevel ERROR\n"
        )
        log = open(etc / f"sshd_{ns}.log", "wb")
        proc = subprocess.Popen(self.exec_argv(index, [SSHD, "-D", "-e", "-f", str(config)]), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_listening(index, addr, port, proc)
        key = (etc / "host_key.pub").read_text().split()
        with open(self.ssh.home / ".ssh" / "known_hosts", "a") as known:
            known.write(f"[{addr}]:{port} {key[0]} {key[1]}\n")
        return SSHServer(addr, port, proc)

    def _wait_listening(self, index: int, addr: str, port: int, proc: subprocess.Popen) -> None:
        probe = f"import socket; socket.create_connection(({addr!r}, {port}), timeout=1).close()"
        deadline = time.time() + 15
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd in {self.namespaces[index]} exited with {proc.returncode}")
            done = subprocess.run(self.exec_argv(index, [sys.executable, "-c", probe]), capture_output=True)
            if done.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"sshd on {addr}:{port} in {self.namespaces[index]} did not start listening")
