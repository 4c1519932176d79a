"""unpatch: bring a backend checkout to its base commit and apply FlagScale's patches.

Nothing is touched until every patch is known to apply, and work in the checkout that the patch
files do not capture is never dropped: without ``--force`` the run stops; with it the work is first
committed to a ``flagscale-backup/<time>`` branch.
"""

from dataclasses import dataclass

from tools.patch.apply import apply_patches, check_patches, describe_failures
from tools.patch.backends import Backend
from tools.patch.baseline import (
    BaseRecord,
    BaseSource,
    base_file,
    origin_url,
    read_base,
    record_submodule_pointer,
    write_base_yaml,
)
from tools.patch.checkout import (
    ensure_checkout,
    head_commit,
    reset_to,
    resolve_commit,
    save_work,
    snapshot_tree,
    stray_commits,
    tree_of,
)
from tools.patch.errors import BaseCommitError, DirtyCheckoutError, PatchApplyError
from tools.patch.patchset import (
    PatchSet,
    apply_order,
    build_patch_set,
    changed_paths,
    compare,
    load_patch_set,
    recover_swap,
)

_SHOW_PATHS = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class UnpatchOptions:
    """What ``unpatch.py`` was asked to do, beyond the backend name."""

    backend_commit: str | None = None
    """Move to this base commit instead of the recorded one (and record it)."""
    force: bool = False
    """Proceed over uncaptured work, after saving it to a backup branch."""
    reject: bool = False
    """Apply what applies and leave .rej files for failing hunks, instead of changing nothing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkState:
    """What in the checkout would be lost by resetting it."""

    tree: str
    """A tree of the whole working state."""
    uncaptured: list[str]
    """Backend paths whose current change is not what the patch files hold."""
    stray_commits: int
    """Commits that only the detached HEAD reaches."""

    @property
    def at_risk(self) -> bool:
        """Whether a reset would lose anything."""
        return bool(self.uncaptured) or self.stray_commits > 0


def unpatch(backend: Backend, options: UnpatchOptions) -> None:
    """Reset ``backend``'s checkout to its base and apply its patches (see module docstring)."""
    ensure_checkout(backend)
    recover_swap(backend.patch_dir)
    recorded = read_base(backend)
    target = _target_commit(backend, recorded, options.backend_commit)
    patches = load_patch_set(backend.patch_dir)
    order = apply_order(patches)
    failures = check_patches(backend.checkout, target, backend.patch_dir, order)
    if failures and not options.reject:
        report = describe_failures(failures, len(order), target, backend.repo_root)
        raise PatchApplyError(f"{backend.name}: {report}\nNothing was changed. {_REJECT_HINT}")
    _protect_work(backend, recorded, target, patches, force=options.force)
    reset_to(backend.checkout, target)
    failures = apply_patches(backend.checkout, backend.patch_dir, order, reject=options.reject)
    _record_base(backend, recorded, target)
    if failures:
        report = describe_failures(failures, len(order), target, backend.repo_root)
        raise PatchApplyError(f"{backend.name}: {report}\n{_AFTER_REJECT}")
    print(f"{backend.name}: {backend.checkout_rel} is at {target[:12]} with {len(order)} patches applied.")


_REJECT_HINT = (
    "Fix these patch files, or rerun with --reject to apply what applies and leave <file>.rej "
    "files for the failing hunks."
)
_AFTER_REJECT = (
    "The other patches were applied and the failing hunks left in <file>.rej files. Merge them by "
    "hand, delete the .rej files, then run tools/patch/patch.py to save the result."
)


def _target_commit(backend: Backend, recorded: BaseRecord | None, requested: str | None) -> str:
    if requested:
        return resolve_commit(backend, requested)
    if recorded is None:
        raise BaseCommitError(
            f"no base commit is recorded for {backend.name} ({backend.checkout_rel} is not a "
            f"submodule and {base_file(backend)} does not exist); run "
            f"tools/patch/patch.py --backend {backend.name} to record the checkout's HEAD, or pass "
            "--backend-commit SHA."
        )
    return resolve_commit(backend, recorded.commit)


def _protect_work(
    backend: Backend,
    recorded: BaseRecord | None,
    target: str,
    patches: PatchSet,
    *,
    force: bool,
) -> None:
    state = work_state(backend, recorded, target, patches)
    if not state.at_risk:
        return
    if not force:
        raise DirtyCheckoutError(_dirty_message(backend, state))
    backup = save_work(backend.checkout, state.tree)
    print(
        f"{backend.name}: saved the work in {backend.checkout_rel} to branch {backup.branch} "
        f"(one commit on top of the previous HEAD, {backup.commit[:12]}); see it with: "
        f"git -C {backend.checkout_rel} show --stat {backup.branch}"
    )


def work_state(backend: Backend, recorded: BaseRecord | None, target: str, patches: PatchSet) -> WorkState:
    """What a reset of the checkout would lose, given the patch files on disk."""
    checkout = backend.checkout
    tree, head = snapshot_tree(checkout), head_commit(checkout)
    base = _present_commit(backend, recorded)
    keep = [commit for commit in (base, target) if commit]
    return WorkState(
        tree=tree,
        uncaptured=_uncaptured(backend, base, head, tree, patches),
        stray_commits=stray_commits(checkout, keep),
    )


def _uncaptured(backend: Backend, base: str | None, head: str, tree: str, patches: PatchSet) -> list[str]:
    if tree == tree_of(backend.checkout, head):
        return []
    if base is None:
        return [change.path for change in changed_paths(backend.checkout, head, tree)]
    return compare(patches, build_patch_set(backend.checkout, base, tree)).differing


def _present_commit(backend: Backend, recorded: BaseRecord | None) -> str | None:
    if recorded is None:
        return None
    try:
        return resolve_commit(backend, recorded.commit)
    except BaseCommitError:
        return None


def _dirty_message(backend: Backend, state: WorkState) -> str:
    reasons = []
    if state.uncaptured:
        shown = ", ".join(state.uncaptured[:_SHOW_PATHS])
        more = f" and {len(state.uncaptured) - _SHOW_PATHS} more" if len(state.uncaptured) > _SHOW_PATHS else ""
        reasons.append(f"uncommitted changes that the patch files do not hold ({shown}{more})")
    if state.stray_commits:
        reasons.append(f"{state.stray_commits} commit(s) on a detached HEAD that no branch holds")
    return (
        f"{backend.checkout_rel} has {' and '.join(reasons)}; refusing to reset it. Save the work "
        f"as patches first (python tools/patch/patch.py --backend {backend.name}), or rerun with "
        "--force to save it to a backup branch and proceed."
    )


def _record_base(backend: Backend, recorded: BaseRecord | None, target: str) -> None:
    if recorded is not None and _present_commit(backend, recorded) == target:
        return
    if recorded is not None and recorded.source is BaseSource.SUBMODULE:
        record_submodule_pointer(backend, target)
        print(
            f"{backend.name}: staged the new base {target[:12]} as the submodule pointer; commit it "
            f"with: git commit {backend.checkout_rel}"
        )
        return
    url = origin_url(backend.checkout) or (recorded.url if recorded else None)
    write_base_yaml(base_file(backend), target, url)
    print(f"{backend.name}: recorded base {target[:12]} in {base_file(backend).relative_to(backend.repo_root)}")
