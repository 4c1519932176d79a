"""Hostfile parsing and its errors."""

from pathlib import Path

import pytest

from flagscale.config.hostfile import Host, parse_hostfile
from flagscale.exceptions import HostfileError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hostfile.txt"
    path.write_text(text)
    return path


def test_parses_hosts_comments_and_options(tmp_path: Path) -> None:
    text = "# cluster\n\nnode1 slots=8 type=A100  # master\nnode2 slots=4 type=A100 user=ml port=2222\n"
    path = _write(tmp_path, text)
    assert parse_hostfile(path) == [
        Host(name="node1", slots=8, type="A100", line=3),
        Host(name="node2", slots=4, type="A100", user="ml", port=2222, line=4),
    ]


def test_missing_hostfile_is_an_error_not_localhost(tmp_path: Path) -> None:
    with pytest.raises(HostfileError, match="does not exist"):
        parse_hostfile(tmp_path / "nope.txt")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("node1 slots=x\n", r"hostfile.txt:1: slots=x must be a positive integer"),
        ("node1\n", "has no slots=N"),
        ("node1 slots=2 gpus=4\n", "cannot read 'gpus=4'"),
        ("node1 slots=2\nnode1 slots=2\n", "already listed on line 1"),
        ("node1 slots=2 type=A\nnode2 slots=2\n", ":2: host 'node2' has no type="),
        ("# only comments\n", "lists no hosts"),
        ("node1 slots=2 port=0\n", "port=0 must be a positive integer"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(HostfileError, match=message):
        parse_hostfile(_write(tmp_path, text))


def test_same_name_different_ports_are_distinct_hosts(tmp_path: Path) -> None:
    hosts = parse_hostfile(_write(tmp_path, "127.0.0.1 slots=1 port=2201\n127.0.0.1 slots=1 port=2202\n"))
    assert [h.slug for h in hosts] == ["127.0.0.1_2201", "127.0.0.1_2202"]
