"""~/.ssh/config is honoured (HostName, User, Port, IdentityFile); hostfile and runner settings win."""

from __future__ import annotations

from pathlib import Path

import pytest

from flagscale.config.hostfile import Host
from flagscale.launcher.transport import SSHSettings, SSHTransport


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(
        "Host gpu1\n  HostName 10.9.9.9\n  User trainer\n  Port 2200\n  IdentityFile ~/.ssh/cluster_key\n"
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_ssh_config_entry_is_used(home: Path) -> None:
    transport = SSHTransport(Host(name="gpu1", slots=8), SSHSettings())
    assert (transport.hostname, transport.port, transport.user) == ("10.9.9.9", 2200, "trainer")
    assert transport.key_files == [str(home / ".ssh" / "cluster_key")]
    assert transport.target == "trainer@10.9.9.9:2200"


def test_hostfile_and_runner_settings_win(home: Path) -> None:
    by_runner = SSHTransport(Host(name="gpu1", slots=8), SSHSettings(port=2222))
    assert by_runner.port == 2222
    by_host = SSHTransport(Host(name="gpu1", slots=8, user="me", port=2301), SSHSettings(port=2222))
    assert (by_host.port, by_host.user) == (2301, "me")
    plain = SSHTransport(Host(name="other", slots=1), SSHSettings())
    assert (plain.hostname, plain.port, plain.user) == ("other", 22, None)
