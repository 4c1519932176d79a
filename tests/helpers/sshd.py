"""Real OpenSSH servers for tests: each on its own loopback address/port, with a throwaway
host key, client key, known_hosts and ~/.ssh/config in a temporary HOME."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def sshd_available() -> bool:
    return Path(SSHD).is_file() and os.geteuid() == 0


@dataclass
class SSHServer:
    addr: str
    port: int
    proc: subprocess.Popen | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop the server (its session: the listener and any sessions it forked)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def crash(self) -> None:
        """The host goes away: the listener and every connection it serves (each in a session of its own)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        doomed = _descendants(self.proc.pid)
        self.stop()
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class SSHCluster:
    """A temporary HOME with a client key, plus any number of sshd servers trusting it.

    With `host_home` (the default) the servers' sessions get HOME set to that temporary HOME, so
    the test hosts do not run this machine's own ~/.bashrc (here `pyenv init`, ~115 ms of CPU per
    command) — on a real cluster each host pays its shell start-up on its own CPU, in parallel."""

    root: Path
    servers: list[SSHServer] = field(default_factory=list)
    host_home: bool = True

    def __post_init__(self) -> None:
        self.home = self.root / "home"
        (self.home / ".ssh").mkdir(parents=True, exist_ok=True, mode=0o700)
        self.etc = self.root / "sshd"
        self.etc.mkdir(exist_ok=True)
        _keygen(self.etc / "host_key")
        _keygen(self.home / ".ssh" / "id_ed25519")
        (self.etc / "authorized_keys").write_text((self.home / ".ssh" / "id_ed25519.pub").read_text())
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home)}

    def start(self, addr: str, port: int | None = None, env: dict[str, str] | None = None) -> SSHServer:
        """An sshd on addr:port; its sessions get `env` (sshd's SetEnv) besides HOME."""
        port = port or free_port(addr)
        set_env = {**({"HOME": str(self.home)} if self.host_home else {}), **(env or {})}
        set_env_line = "SetEnv " + " ".join(f"{k}={v}" for k, v in set_env.items()) + "\n" if set_env else ""
        config = self.etc / f"sshd_{addr}_{port}.conf"
        config.write_text(
            f"Port {port}\nListenAddress {addr}\nHostKey {self.etc / 'host_key'}\n"
            f"PidFile {self.etc / f'sshd_{addr}_{port}.pid'}\nAuthorizedKeysFile {self.etc / 'authorized_keys'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "StrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\nMaxStartups 100:30:200\nMaxSessions 100\n"
            "LogLevel ERROR\n" + set_env_line
        )
        log = open(self.etc / f"sshd_{addr}_{port}.log", "wb")
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        server = SSHServer(addr, port, proc)
        _wait_listening(addr, port, proc)
        host_key = (self.etc / "host_key.pub").read_text().split()
        with open(self.home / ".ssh" / "known_hosts", "a") as known:
            known.write(f"[{addr}]:{port} {host_key[0]} {host_key[1]}\n")
        self.servers.append(server)
        return server

    def hostfile(self, path: Path, slots: int = 1, servers: list[SSHServer] | None = None) -> Path:
        lines = [f"{s.addr} slots={slots} port={s.port}" for s in servers or self.servers]
        path.write_text("\n".join(lines) + "\n")
        return path

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(name)] = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def free_port(addr: str) -> int:
    with socket.socket() as sock:
        sock.bind((addr, 0))
        return sock.getsockname()[1]


def _keygen(path: Path) -> None:
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _wait_listening(addr: str, port: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 10
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd on {addr}:{port} exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex((addr, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"sshd on {addr}:{port} did not start listening")
