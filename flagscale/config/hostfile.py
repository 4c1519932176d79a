"""Hostfile parsing: one `HOST slots=N [type=T] [user=U] [port=P]` per line, `#` comments."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from flagscale.exceptions import HostfileError

_KEYS = ("slots", "type", "user", "port")


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    """One host of a job; `user`/`port` left None fall back to the runner's/ssh config defaults."""

    name: str
    slots: int
    type: str | None = None
    user: str | None = None
    port: int | None = None
    line: int = 0

    @property
    def slug(self) -> str:
        """A file-name-safe label, unique per host:port (used for scripts and logs)."""
        label = re.sub(r"[^A-Za-z0-9._-]", "_", self.name)
        return f"{label}_{self.port}" if self.port else label

    @property
    def is_local(self) -> bool:
        return self.name == "localhost" and self.port is None and self.user is None


LOCALHOST = Host(name="localhost", slots=0)


def parse_hostfile(path: str | Path) -> list[Host]:
    """Parse a hostfile; a missing file or a bad line raises HostfileError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise HostfileError(
            f"hostfile {path} does not exist (experiment.runner.hostfile). "
            "Create it, or remove experiment.runner.hostfile to run on this machine only."
        )
    hosts: list[Host] = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        text = raw.split("#", 1)[0].strip()
        if text:
            hosts.append(_parse_line(text, f"{path}:{number}", number))
    if not hosts:
        raise HostfileError(f"hostfile {path} lists no hosts; add lines like 'node1 slots=8 type=A100'")
    _check_hosts(hosts, path)
    return hosts


def _parse_line(text: str, where: str, number: int) -> Host:
    name, *fields = text.split()
    values: dict[str, str] = {}
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep or key not in _KEYS or not value:
            raise HostfileError(
                f"{where}: cannot read '{field}'; expected 'HOST slots=N [type=T] [user=U] [port=P]'"
            )
        if key in values:
            raise HostfileError(f"{where}: '{key}' given twice")
        values[key] = value
    if "slots" not in values:
        raise HostfileError(f"{where}: host '{name}' has no slots=N (the number of processes it can run)")
    return Host(
        name=name,
        slots=_positive_int(values["slots"], "slots", where),
        type=values.get("type"),
        user=values.get("user"),
        port=_positive_int(values["port"], "port", where) if "port" in values else None,
        line=number,
    )


def _positive_int(value: str, key: str, where: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise HostfileError(f"{where}: {key}={value} must be a positive integer")
    return int(value)


def _check_hosts(hosts: list[Host], path: Path) -> None:
    seen: dict[tuple[str, int | None], int] = {}
    for host in hosts:
        key = (host.name, host.port)
        if key in seen:
            raise HostfileError(f"{path}:{host.line}: host '{host.name}' already listed on line {seen[key]}")
        seen[key] = host.line
    typed = [h for h in hosts if h.type]
    if typed and len(typed) != len(hosts):
        untyped = next(h for h in hosts if not h.type)
        raise HostfileError(
            f"{path}:{untyped.line}: host '{untyped.name}' has no type= while other hosts have one; "
            "give every host a type= or none"
        )
