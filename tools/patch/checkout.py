"""A backend's git checkout: validate it, snapshot its work, back that work up, reset it."""

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tools.patch.backends import Backend
from tools.patch.errors import BaseCommitError, MissingCheckoutError
from tools.patch.gitcmd import git_succeeds, git_text, run_git

BACKUP_PREFIX = "flagscale-backup"
_BACKUP_IDENTITY = {
    "GIT_AUTHOR_NAME": "FlagScale unpatch",
    "GIT_AUTHOR_EMAIL": "unpatch@flagscale.invalid",
    "GIT_COMMITTER_NAME": "FlagScale unpatch",
    "GIT_COMMITTER_EMAIL": "unpatch@flagscale.invalid",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Backup:
    """Where ``save_work`` put the checkout's work."""

    branch: str
    commit: str


def ensure_checkout(backend: Backend) -> None:
    """Fail unless ``third_party/<Backend>`` is the top of a git checkout of its own."""
    checkout = backend.checkout
    how = (
        f"clone it (git clone <upstream-url> {backend.checkout_rel}) or, for a submodule, "
        f"run: git submodule update --init {backend.checkout_rel}"
    )
    if not checkout.is_dir() or not any(checkout.iterdir()):
        raise MissingCheckoutError(f"no checkout of {backend.name} at {checkout}; {how}")
    proc = run_git(checkout, ["rev-parse", "--show-toplevel"], check=False)
    toplevel = proc.stdout.decode("utf-8", "surrogateescape").strip()
    if proc.returncode != 0 or Path(toplevel).resolve() != checkout.resolve():
        raise MissingCheckoutError(
            f"{checkout} is not a git checkout of its own (git sees "
            f"{toplevel or 'no repository'} there); the tools only touch a backend's own "
            f"checkout: {how}"
        )


def resolve_commit(backend: Backend, rev: str) -> str:
    """The full sha of commit ``rev`` in the checkout, or a ``BaseCommitError`` saying how to fetch it."""
    if rev.startswith("-"):
        raise BaseCommitError(f"{rev!r} is not a commit; pass a sha such as 1a2b3c4d.")
    proc = run_git(
        backend.checkout,
        ["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        check=False,
    )
    if proc.returncode != 0:
        raise BaseCommitError(
            f"commit {rev} is not in {backend.checkout_rel}; fetch it first: "
            f"git -C {backend.checkout_rel} fetch origin {rev}"
        )
    return proc.stdout.decode("ascii").strip()


def head_commit(checkout: Path) -> str:
    """The sha HEAD points at."""
    return git_text(checkout, ["rev-parse", "--verify", "HEAD^{commit}"])


def tree_of(checkout: Path, commit: str) -> str:
    """The tree sha of ``commit``."""
    return git_text(checkout, ["rev-parse", "--verify", f"{commit}^{{tree}}"])


def snapshot_tree(checkout: Path) -> str:
    """A tree of the whole working state (tracked, staged, unstaged and untracked, not ignored).

    Built in a temporary index, so the checkout's own index and files are left untouched.
    """
    real_index = Path(git_text(checkout, ["rev-parse", "--path-format=absolute", "--git-path", "index"]))
    with tempfile.TemporaryDirectory(prefix="flagscale-patch-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        if real_index.is_file():
            # copy2 keeps the index file's mtime, which git's racy-clean check compares entries to;
            # a fresh mtime would make same-size edits made right after the last index write invisible.
            shutil.copy2(real_index, env["GIT_INDEX_FILE"])
        else:
            run_git(checkout, ["read-tree", "HEAD"], env=env)
        run_git(checkout, ["add", "--all", "--", "."], env=env)
        return git_text(checkout, ["write-tree"], env=env)


def stray_commits(checkout: Path, keep: list[str]) -> int:
    """How many commits only a detached HEAD reaches (no branch, tag, remote or ``keep`` commit)."""
    args = [
        "rev-list",
        "--count",
        "HEAD",
        "--not",
        "--branches",
        "--tags",
        "--remotes",
        *keep,
    ]
    return int(git_text(checkout, args))


def save_work(checkout: Path, tree: str) -> Backup:
    """Commit ``tree`` (on top of HEAD) to a new ``flagscale-backup/<time>`` branch."""
    message = "flagscale unpatch --force: work saved before resetting the checkout"
    args = ["commit-tree", tree, "-p", head_commit(checkout), "-m", message]
    commit = git_text(checkout, args, env=_BACKUP_IDENTITY)
    branch = _free_branch(checkout, f"{BACKUP_PREFIX}/{time.strftime('%Y%m%d-%H%M%S')}")
    run_git(checkout, ["branch", branch, commit])
    return Backup(branch=branch, commit=commit)


def _free_branch(checkout: Path, wanted: str) -> str:
    name, suffix = wanted, 1
    while git_succeeds(checkout, ["rev-parse", "--verify", "--quiet", f"refs/heads/{name}"]):
        name, suffix = f"{wanted}-{suffix}", suffix + 1
    return name


def reset_to(checkout: Path, commit: str) -> None:
    """Detach HEAD at ``commit`` and drop every local change and untracked (not ignored) file."""
    run_git(checkout, ["checkout", "--quiet", "--force", "--detach", commit])
    run_git(checkout, ["clean", "--force", "-d", "--quiet"])
