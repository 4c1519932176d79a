"""A local process named in a job record by pid and start time (field 22 of /proc/PID/stat), so that a later
signal never reaches a process that reused the number."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any


def process_identity(pid: int) -> dict[str, Any]:
    """{pid, start} of a live process on this machine."""
    return {"pid": pid, "start": start_time(pid)}


def start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def is_alive(identity: dict[str, Any]) -> bool:
    """Whether the process an identity names still runs (the same one, not a reused pid), and is not this one."""
    pid, start = identity.get("pid"), identity.get("start")
    return isinstance(pid, int) and pid != os.getpid() and start is not None and start_time(pid) == start


def terminate(identity: dict[str, Any], timeout: float) -> bool:
    """SIGTERM the process an identity names and wait for it to end; SIGKILL after `timeout` seconds. False
    if it was not running."""
    if not is_alive(identity):
        return False
    pid = identity["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while is_alive(identity) and time.monotonic() < deadline:
        time.sleep(0.2)
    if is_alive(identity):
        os.kill(pid, signal.SIGKILL)
        while is_alive(identity):
            time.sleep(0.05)
    return True
