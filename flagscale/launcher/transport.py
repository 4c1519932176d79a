"""How commands reach a host: one interface, a local and an SSH (paramiko) implementation.

Commands are argv lists; the SSH side joins them with shlex.join, so no value is ever
interpreted by a shell on the way.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flagscale.config.hostfile import Host
from flagscale.exceptions import LaunchError
from flagscale.spec.private import DIR_MODE, FILE_MODE, private_dirs, write_private

if TYPE_CHECKING:  # imported where used: a dryrun on this machine alone needs no SSH library
    import paramiko


@dataclass(frozen=True, slots=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SSHSettings:
    """Connection defaults from experiment.runner (a host's own user=/port= win)."""

    port: int | None = None
    strict_host_key_checking: bool = True
    connect_timeout: float = 10.0


class Transport(ABC):
    """Runs commands and writes files on one host."""

    def __init__(self, host: Host) -> None:
        self.host = host

    @property
    def target(self) -> str:
        """What the user sees as the host's address (e.g. `user@node1:2222`)."""
        return self.host.name

    @abstractmethod
    def run(self, argv: list[str], timeout: float | None = None) -> CommandResult: ...

    @abstractmethod
    def write_file(self, path: str, text: str, mode: int = FILE_MODE, private: tuple[str, ...] = ()) -> None:
        """Write `text` into a file created with `mode`; the folders in `private` (parents first) are made 0700
        before it is written."""

    @abstractmethod
    def read_text(self, path: str) -> str | None:
        """The file's text, or None if the host has no such file."""

    @abstractmethod
    def stream(self, argv: list[str]) -> Iterator[str]:
        """Yield the command's output lines as they come (used by `logs -f`)."""

    def close(self) -> None:
        """Release the connection, if any."""


class LocalTransport(Transport):
    """This machine: argv runs directly, no shell in between."""

    def run(self, argv: list[str], timeout: float | None = None) -> CommandResult:
        """Run argv in a session of its own: a Ctrl-C in this terminal interrupts the launcher, which then
        rolls back, never a host controller half-way through starting or stopping a job."""
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
        except subprocess.TimeoutExpired:
            raise LaunchError(f"host {self.host.name}: {Path(argv[0]).name} did not finish within {timeout:.0f}s; "
                              "is this machine overloaded?") from None
        return CommandResult(proc.returncode, proc.stdout, proc.stderr)

    def write_file(self, path: str, text: str, mode: int = FILE_MODE, private: tuple[str, ...] = ()) -> None:
        private_dirs(*private)
        write_private(path, text, mode)

    def read_text(self, path: str) -> str | None:
        try:
            return Path(path).read_text(errors="replace")
        except FileNotFoundError:
            return None

    def stream(self, argv: list[str]) -> Iterator[str]:
        with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL) as proc:
            assert proc.stdout is not None
            try:
                yield from proc.stdout
            finally:
                proc.terminate()


class SSHTransport(Transport):
    """A remote host over one paramiko connection, honouring ~/.ssh/config and known_hosts."""

    def __init__(self, host: Host, settings: SSHSettings) -> None:
        super().__init__(host)
        self.settings = settings
        self.hostname, self.port, self.user, self.key_files = _resolve(host, settings)
        self._client: paramiko.SSHClient | None = None

    @property
    def target(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"{user}{self.hostname}:{self.port}"

    def connect(self) -> paramiko.SSHClient:
        if self._client is None:
            self._client = self._open()
        return self._client

    def _open(self) -> paramiko.SSHClient:
        import paramiko

        client = paramiko.SSHClient()
        client.load_system_host_keys()
        strict = self.settings.strict_host_key_checking
        client.set_missing_host_key_policy(paramiko.RejectPolicy() if strict else paramiko.AutoAddPolicy())
        try:
            client.connect(
                self.hostname, port=self.port, username=self.user, key_filename=self.key_files or None,
                timeout=self.settings.connect_timeout, banner_timeout=self.settings.connect_timeout,
                auth_timeout=self.settings.connect_timeout,
            )
        except paramiko.AuthenticationException as err:
            raise LaunchError(f"{self._where()}: SSH authentication failed ({err}); check the key/user") from None
        except paramiko.BadHostKeyException:
            raise LaunchError(f"{self._where()}: host key differs from known_hosts; verify the host") from None
        except paramiko.SSHException as err:
            raise LaunchError(f"{self._where()}: {err}{_known_hosts_hint(err)}") from None
        except (TimeoutError, OSError) as err:
            reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
            raise LaunchError(f"{self._where()}: cannot connect ({reason}); is sshd running there?") from None
        return client

    def _where(self) -> str:
        line = f" (hostfile line {self.host.line})" if self.host.line else ""
        return f"host {self.host.name}{line} via {self.target}"

    def run(self, argv: list[str], timeout: float | None = None) -> CommandResult:
        import paramiko

        client = self.connect()
        try:
            _, stdout, stderr = client.exec_command(shlex.join(argv), timeout=timeout)
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            code = stdout.channel.recv_exit_status()
        except (TimeoutError, paramiko.SSHException, OSError) as exc:
            self.close()  # the next command connects afresh (the host may be back by then)
            raise LaunchError(f"{self._where()}: connection lost ({exc or type(exc).__name__})") from None
        return CommandResult(code, out, err)

    def write_file(self, path: str, text: str, mode: int = FILE_MODE, private: tuple[str, ...] = ()) -> None:
        import paramiko

        self.run(["mkdir", "-p", *private, os.path.dirname(path)])
        try:
            sftp = self.connect().open_sftp()
            try:
                for folder in private:
                    sftp.chmod(folder, DIR_MODE)
                with sftp.open(path, "w") as handle:
                    sftp.chmod(path, mode)  # before the text goes in
                    handle.write(text)
            finally:
                sftp.close()
        except (OSError, paramiko.SSHException) as err:
            raise LaunchError(f"{self._where()}: cannot write {path} over SFTP ({err or type(err).__name__}); "
                              "check that the folder is writable there") from None

    def read_text(self, path: str) -> str | None:
        import paramiko

        try:
            sftp = self.connect().open_sftp()
            try:
                with sftp.open(path, "r") as handle:
                    return handle.read().decode(errors="replace")
            finally:
                sftp.close()
        except FileNotFoundError:
            return None
        except (OSError, paramiko.SSHException) as err:
            raise LaunchError(f"{self._where()}: cannot read {path} over SFTP ({err or type(err).__name__})") from None

    def stream(self, argv: list[str]) -> Iterator[str]:
        channel = self.connect().get_transport().open_session()  # type: ignore[union-attr]
        channel.exec_command(shlex.join(argv))
        try:
            yield from channel.makefile("r")
        finally:
            channel.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _resolve(host: Host, settings: SSHSettings) -> tuple[str, int, str | None, list[str]]:
    """Hostname, port, user and identity files: hostfile > runner.ssh_port > ~/.ssh/config > defaults."""
    import paramiko

    config = paramiko.SSHConfig()
    path = Path(os.path.expanduser("~/.ssh/config"))
    if path.is_file():
        config = paramiko.SSHConfig.from_path(str(path))
    entry = config.lookup(host.name)
    port = host.port or settings.port or int(entry.get("port", 22))
    user = host.user or entry.get("user")
    return entry.get("hostname", host.name), port, user, list(entry.get("identityfile", []))


def _known_hosts_hint(err: Exception) -> str:
    if "not found in known_hosts" in str(err):
        return " (add it with ssh-keyscan, or set experiment.runner.ssh_strict_host_key_checking: false)"
    return ""


def open_transport(host: Host, settings: SSHSettings) -> Transport:
    """The transport for a host: local for the implicit localhost, SSH otherwise."""
    return LocalTransport(host) if host.is_local else SSHTransport(host, settings)
