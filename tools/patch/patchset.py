"""A patch set: one git patch per changed backend file, under ``flagscale/backends/<Backend>/``.

The patch for backend file ``megatron/core/foo.py`` is ``megatron/core/foo.py.patch``. Renames are
stored as a deletion plus an addition, so that every patch touches exactly one path and the set
applies in any order (deletions go first, for a file that becomes a directory or back).
"""

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tools.patch.errors import PatchSetError
from tools.patch.gitcmd import run_git

PATCH_SUFFIX = ".patch"

# Backend path -> the bytes of its patch file.
PatchSet = dict[str, bytes]

# Fixed so that the same edit always gives the same bytes, whatever the user's git config says.
_CONFIG = [
    arg
    for setting in (
        "core.quotePath=true",
        "diff.suppressBlankEmpty=false",
        "diff.mnemonicPrefix=false",
    )
    for arg in ("-c", setting)
]
_DIFF = [
    "diff", "--no-color", "--no-ext-diff", "--no-textconv", "--no-relative", "--no-renames",
    "--binary", "--full-index", "--unified=3", "--diff-algorithm=myers", "--indent-heuristic",
    "--inter-hunk-context=0", "--src-prefix=a/", "--dst-prefix=b/",
]  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Change:
    """One backend path that differs between two trees."""

    status: str
    """git's letter: A (added), M (modified), D (deleted), T (type changed)."""
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SetDiff:
    """How a new patch set differs from the old one, by backend path."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def differing(self) -> list[str]:
        """Every path whose patch was added, changed or removed."""
        return sorted(self.added + self.changed + self.removed)


def changed_paths(checkout: Path, base: str, tree: str) -> list[Change]:
    """The paths that differ between commit/tree ``base`` and ``tree``, in git's order."""
    out = run_git(
        checkout,
        [
            *_CONFIG,
            "diff",
            "--name-status",
            "-z",
            "--no-renames",
            "--no-relative",
            base,
            tree,
        ],
    ).stdout
    fields = out.decode("utf-8", "surrogateescape").split("\0")
    return [Change(status=fields[i], path=fields[i + 1]) for i in range(0, len(fields) - 1, 2)]


def build_patch_set(checkout: Path, base: str, tree: str) -> PatchSet:
    """One patch per path that differs between ``base`` and ``tree``."""
    return {
        change.path: file_patch(checkout, base, tree, change.path) for change in changed_paths(checkout, base, tree)
    }


def file_patch(checkout: Path, base: str, tree: str, path: str) -> bytes:
    """The git patch (binary-safe) that turns ``path`` in ``base`` into ``path`` in ``tree``."""
    return run_git(checkout, [*_CONFIG, *_DIFF, base, tree, "--", path]).stdout


def patch_file(patch_dir: Path, path: str) -> Path:
    """The patch file for backend path ``path``."""
    return patch_dir / f"{path}{PATCH_SUFFIX}"


def apply_order(patches: PatchSet) -> list[str]:
    """Backend paths in the order their patches apply: deletions first, then by path."""
    return sorted(patches, key=lambda path: (not _is_deletion(patches[path]), path))


def _is_deletion(patch: bytes) -> bool:
    header = patch.split(b"\n@@", 1)[0].split(b"\nGIT binary patch", 1)[0]
    return b"\ndeleted file mode " in header


def load_patch_set(patch_dir: Path) -> PatchSet:
    """The patch set stored under ``patch_dir`` (empty when the directory does not exist)."""
    if not patch_dir.is_dir():
        return {}
    files = (p for p in patch_dir.rglob(f"*{PATCH_SUFFIX}") if p.is_file())
    return {p.relative_to(patch_dir).as_posix()[: -len(PATCH_SUFFIX)]: p.read_bytes() for p in files}


def load_extras(patch_dir: Path) -> dict[str, bytes]:
    """Files under ``patch_dir`` that are not patches (base.yaml, notes); kept across rewrites."""
    if not patch_dir.is_dir():
        return {}
    files = (p for p in patch_dir.rglob("*") if p.is_file() and not p.name.endswith(PATCH_SUFFIX))
    return {p.relative_to(patch_dir).as_posix(): p.read_bytes() for p in files}


def compare(old: PatchSet, new: PatchSet) -> SetDiff:
    """Sort every backend path of ``old`` and ``new`` into added/changed/removed/unchanged."""
    diff = SetDiff()
    for path in sorted(old.keys() | new.keys()):
        if path not in old:
            diff.added.append(path)
        elif path not in new:
            diff.removed.append(path)
        else:
            (diff.unchanged if old[path] == new[path] else diff.changed).append(path)
    return diff


def write_patch_set(patch_dir: Path, patches: PatchSet, extras: dict[str, bytes]) -> None:
    """Replace the directory ``patch_dir`` by ``patches`` plus ``extras``, as one swap.

    Everything is written to a sibling temp directory first; ``patch_dir`` is replaced only once
    that succeeded, and put back if the swap itself fails. On any error the old set is intact.
    """
    patch_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{patch_dir.name}.new-", dir=patch_dir.parent))
    try:
        _fill(
            tmp,
            {f"{path}{PATCH_SUFFIX}": data for path, data in patches.items()} | extras,
        )
        tmp.chmod(patch_dir.stat().st_mode & 0o7777 if patch_dir.is_dir() else _dir_mode())
        _swap(tmp, patch_dir)
    except OSError as exc:
        raise PatchSetError(
            f"could not write the patch set to {patch_dir} ({exc}); the previous patch files are "
            "unchanged. Fix the cause (disk space, permissions) and rerun."
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fill(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in sorted(files.items()):
        write_file(root / rel, data)


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, creating its parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def recover_swap(patch_dir: Path) -> None:
    """Clean up after a swap that was killed midway: put the old set back if it is all there is."""
    leftovers = sorted(patch_dir.parent.glob(f".{patch_dir.name}.*-*")) if patch_dir.parent.is_dir() else []
    for path in leftovers:
        if path.name.startswith(f".{patch_dir.name}.old-") and not patch_dir.exists():
            os.rename(path, patch_dir)
            print(f"restored the patch set of an interrupted run from {path.name} to {patch_dir}")
        elif path.name.startswith((f".{patch_dir.name}.old-", f".{patch_dir.name}.new-")):
            shutil.rmtree(path, ignore_errors=True)


def _swap(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _dir_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o777 & ~umask
