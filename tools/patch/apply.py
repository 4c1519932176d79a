"""Check and apply a patch set to a backend checkout; explain the patches that do not apply."""

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tools.patch.gitcmd import run_git
from tools.patch.patchset import patch_file

_FAILED_AT = re.compile(r"patch failed: (?P<path>.+):(?P<line>\d+)$")
_MAX_HUNK_LINES = 30


@dataclass(frozen=True, slots=True, kw_only=True)
class PatchFailure:
    """A patch that did not apply."""

    path: str
    """The backend path the patch is for."""
    patch: Path
    """The patch file."""
    reason: str
    """git apply's own error lines."""
    hunk: str | None
    """The first hunk git could not place, when git names one."""


def check_patches(checkout: Path, commit: str, patch_dir: Path, paths: list[str]) -> list[PatchFailure]:
    """Check each patch, in order, against ``commit`` without touching the checkout.

    The patches are applied one by one to a temporary index that starts as ``commit``, so each check
    sees the earlier patches, exactly as the real apply will.
    """
    failures = []
    with tempfile.TemporaryDirectory(prefix="flagscale-unpatch-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        run_git(checkout, ["read-tree", commit], env=env)
        for path in paths:
            proc = run_git(
                checkout,
                ["apply", "--cached", str(patch_file(patch_dir, path))],
                env=env,
                check=False,
            )
            if proc.returncode != 0:
                failures.append(_failure(patch_dir, path, proc.stderr))
    return failures


def apply_patches(checkout: Path, patch_dir: Path, paths: list[str], *, reject: bool) -> list[PatchFailure]:
    """Apply each patch to the working tree; with ``reject`` keep the hunks that apply (rest to .rej)."""
    failures = []
    options = ["--reject"] if reject else []
    for path in paths:
        proc = run_git(checkout, ["apply", *options, str(patch_file(patch_dir, path))], check=False)
        if proc.returncode != 0:
            failures.append(_failure(patch_dir, path, proc.stderr))
    return failures


def _failure(patch_dir: Path, path: str, stderr: bytes) -> PatchFailure:
    lines = stderr.decode("utf-8", "replace").splitlines()
    reason = [line for line in lines if line.startswith(("error:", "fatal:"))] or lines
    patch = patch_file(patch_dir, path)
    line = next((m.group("line") for m in map(_FAILED_AT.search, lines) if m), None)
    hunk = _hunk_at(patch.read_bytes(), int(line)) if line else None
    return PatchFailure(path=path, patch=patch, reason="\n".join(reason).strip(), hunk=hunk)


def _hunk_at(patch: bytes, old_start: int) -> str | None:
    """The hunk of ``patch`` whose old side starts at line ``old_start``."""
    text = patch.decode("utf-8", "replace")
    for hunk in re.split(r"\n(?=@@ )", text)[1:]:
        header = re.match(r"@@ -(\d+)", hunk)
        if header and int(header.group(1)) == old_start:
            return _truncate(hunk.rstrip("\n").split("\n"))
    return None


def _truncate(lines: list[str]) -> str:
    if len(lines) <= _MAX_HUNK_LINES:
        return "\n".join(lines)
    more = len(lines) - _MAX_HUNK_LINES
    return "\n".join([*lines[:_MAX_HUNK_LINES], f"... ({more} more lines)"])


def describe_failures(failures: list[PatchFailure], total: int, commit: str, repo_root: Path) -> str:
    """A readable report: each failing file, git's reason and the failing hunk."""
    parts = [f"{len(failures)} of {total} patches do not apply to {commit[:12]}:"]
    for failure in failures:
        parts.append(f"  {failure.path}  ({_rel(failure.patch, repo_root)})")
        parts.extend(f"    {line}" for line in failure.reason.splitlines())
        if failure.hunk:
            parts.append("    failing hunk:")
            parts.extend(f"      {line}" for line in failure.hunk.splitlines())
    return "\n".join(parts)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
