"""patch: turn the edits in a backend checkout into its patch files.

Every change relative to the base commit counts: committed on top of it, staged, unstaged and
untracked (not ignored) alike. The old patch set is replaced in one swap, so a failed run leaves it
intact.
"""

from dataclasses import dataclass
from pathlib import Path

from tools.patch.backends import Backend
from tools.patch.baseline import (
    BASE_FILE,
    BaseRecord,
    BaseSource,
    base_yaml_bytes,
    origin_url,
    read_base,
    record_submodule_pointer,
)
from tools.patch.checkout import (
    ensure_checkout,
    head_commit,
    resolve_commit,
    snapshot_tree,
)
from tools.patch.errors import PatchSetError
from tools.patch.patchset import (
    PATCH_SUFFIX,
    Change,
    SetDiff,
    changed_paths,
    compare,
    file_patch,
    load_extras,
    load_patch_set,
    recover_swap,
    write_patch_set,
)

_LEFTOVERS = (".rej", ".orig")
_STATUS_WORDS = {"A": "added", "M": "modified", "D": "deleted", "T": "type changed"}


@dataclass(frozen=True, slots=True, kw_only=True)
class PatchOptions:
    """What ``patch.py`` was asked to do, beyond the backend name."""

    backend_commit: str | None = None
    """Diff against (and record) this base commit instead of the recorded one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BaseChoice:
    """The base to diff against, and how to record it if it is new."""

    commit: str
    base_yaml: bytes | None = None
    """New base.yaml content (plain checkout with a new or first base)."""
    gitlink: bool = False
    """Whether the submodule pointer must be moved to ``commit``."""


def export(backend: Backend, options: PatchOptions) -> SetDiff:
    """Rewrite ``flagscale/backends/<Backend>/`` from the checkout; returns what changed."""
    ensure_checkout(backend)
    recover_swap(backend.patch_dir)
    base = _choose_base(backend, read_base(backend), options.backend_commit)
    tree = snapshot_tree(backend.checkout)
    changes = changed_paths(backend.checkout, base.commit, tree)
    _refuse_leftovers(backend, changes)
    new = {change.path: file_patch(backend.checkout, base.commit, tree, change.path) for change in changes}
    old = load_patch_set(backend.patch_dir)
    extras = load_extras(backend.patch_dir) | ({BASE_FILE: base.base_yaml} if base.base_yaml else {})
    write_patch_set(backend.patch_dir, new, extras)
    _record(backend, base)
    diff = compare(old, new)
    print(_summary(backend, base.commit, changes, diff))
    return diff


def _choose_base(backend: Backend, recorded: BaseRecord | None, requested: str | None) -> BaseChoice:
    if recorded is not None and recorded.source is BaseSource.SUBMODULE:
        commit = resolve_commit(backend, requested or recorded.commit)
        return BaseChoice(commit=commit, gitlink=commit != recorded.commit)
    if requested:
        commit = resolve_commit(backend, requested)
    elif recorded is not None:
        return BaseChoice(commit=resolve_commit(backend, recorded.commit))
    else:
        commit = head_commit(backend.checkout)
        print(f"{backend.name}: no base recorded yet; using the checkout's HEAD {commit[:12]}.")
    url = origin_url(backend.checkout) or (recorded.url if recorded else None)
    return BaseChoice(commit=commit, base_yaml=base_yaml_bytes(commit, url))


def _refuse_leftovers(backend: Backend, changes: list[Change]) -> None:
    leftovers = [c.path for c in changes if c.status == "A" and c.path.endswith(_LEFTOVERS)]
    if leftovers:
        raise PatchSetError(
            f"{backend.checkout_rel} has leftover files from a rejected apply: {', '.join(leftovers)}. "
            "Merge their hunks by hand, delete them, then rerun patch.py."
        )


def _record(backend: Backend, base: BaseChoice) -> None:
    if base.gitlink:
        record_submodule_pointer(backend, base.commit)
        print(f"{backend.name}: staged the new base {base.commit[:12]} as the submodule pointer.")
    elif base.base_yaml:
        print(f"{backend.name}: recorded base {base.commit[:12]} in {_rel(backend, backend.patch_dir / BASE_FILE)}.")


def _summary(backend: Backend, commit: str, changes: list[Change], diff: SetDiff) -> str:
    counts: dict[str, int] = {}
    for change in changes:
        word = _STATUS_WORDS.get(change.status, change.status)
        counts[word] = counts.get(word, 0) + 1
    files = ", ".join(f"{n} {word}" for word, n in counts.items()) or "no changes"
    where = _rel(backend, backend.patch_dir)
    patches = (
        f"{where}: {len(diff.added)} patches added, {len(diff.changed)} changed, "
        f"{len(diff.removed)} removed, {len(diff.unchanged)} unchanged."
    )
    lines = [
        f"{backend.name}: {len(changes)} files differ from base {commit[:12]} ({files}).",
        patches,
    ]
    lines += [f"  added    {path}{PATCH_SUFFIX}" for path in diff.added]
    lines += [f"  changed  {path}{PATCH_SUFFIX}" for path in diff.changed]
    lines += [f"  removed  {path}{PATCH_SUFFIX}" for path in diff.removed]
    return "\n".join(lines)


def _rel(backend: Backend, path: Path) -> str:
    return path.relative_to(backend.repo_root).as_posix()
