"""Run git as an argv list (never through a shell) and turn failures into ``GitError``."""

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from tools.patch.errors import GitError

# Pathspecs are file names, never globs or magic (a file may be called "a*b" or ":x").
_BASE_ENV = {"GIT_LITERAL_PATHSPECS": "1", "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0"}
# Inherited from a hook or a wrapper, these would point git at another repository than ``cwd``.
_REPO_ENV = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_COMMON_DIR",
    "GIT_PREFIX",
)


def run_git(
    cwd: Path,
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``git <args>`` in ``cwd`` and return the completed process (stdout/stderr as bytes).

    With ``check`` a non-zero exit raises ``GitError`` naming the command and git's message.
    """
    argv = ["git", *args]
    inherited = {key: value for key, value in os.environ.items() if key not in _REPO_ENV}
    full_env = {**inherited, **_BASE_ENV, **(env or {})}
    try:
        proc = subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise GitError("git was not found on PATH; install git (>= 2.31) and retry.") from exc
    if check and proc.returncode != 0:
        raise GitError(_failure_message(cwd, argv, proc))
    return proc


def git_text(cwd: Path, args: Sequence[str], *, env: Mapping[str, str] | None = None) -> str:
    """Run git and return its stdout decoded and stripped."""
    return run_git(cwd, args, env=env).stdout.decode("utf-8", "surrogateescape").strip()


def git_succeeds(cwd: Path, args: Sequence[str], *, env: Mapping[str, str] | None = None) -> bool:
    """Whether ``git <args>`` exits 0 (its output is discarded)."""
    return run_git(cwd, args, env=env, check=False).returncode == 0


def _failure_message(cwd: Path, argv: Sequence[str], proc: subprocess.CompletedProcess[bytes]) -> str:
    stderr = proc.stderr.decode("utf-8", "replace").strip() or "(no message)"
    return f"`{shlex.join(argv)}` failed in {cwd} (exit {proc.returncode}):\n{stderr}"
