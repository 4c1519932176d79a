"""Owner-only files: what holds a job's environment (its scripts, job.json, the saved config, the logs
FlagScale writes) is readable by the user who launched it alone, whatever the umask: folders 0700,
files 0600, scripts 0700. Only the run's own folders are made private (`<exp_dir>/logs/<run id>` and
below); the experiment folder keeps its mode, since it also holds checkpoints others may share."""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
SCRIPT_MODE = 0o700


def private_dirs(*paths: str | Path) -> None:
    """Create each folder (its missing parents with the usual mode) and make it 0700, in the order given."""
    for path in paths:
        Path(path).mkdir(parents=True, exist_ok=True)
        os.chmod(path, DIR_MODE)


def write_private(path: str | Path, text: str, mode: int = FILE_MODE) -> None:
    """Write `text` atomically into a file created with `mode` (never readable by others, not even briefly)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask may have taken bits away; set exactly `mode`
            handle.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
