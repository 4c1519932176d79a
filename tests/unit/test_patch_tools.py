"""tools/patch: unpatch -> edit -> patch round trips on real (local, tiny) git repositories."""

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools.patch import patchset  # noqa: E402
from tools.patch.backends import BACKENDS, canonical_name  # noqa: E402
from tools.patch.cli import main_patch, main_unpatch  # noqa: E402
from tools.patch.errors import UnknownBackendError  # noqa: E402

BACKEND = "Megatron-LM"
CHECKOUT = Path("third_party") / BACKEND
PATCHES = Path("flagscale") / "backends" / BACKEND
BINARY = bytes(range(256)) * 8
FOO = "".join(f"line {i}\n" for i in range(1, 41))


def git(cwd: Path, *args: str) -> str:
    """Run git with a fixed identity; return stdout."""
    argv = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    argv += ["-c", "init.defaultBranch=main", "-c", "protocol.file.allow=always", *args]
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{argv} failed: {proc.stderr}"
    return proc.stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")


@pytest.fixture(autouse=True)
def _isolated_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's own git config out of the tests."""
    empty = tmp_path / "empty-gitconfig"
    empty.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    """A tiny 'upstream backend' repository with one base commit."""
    repo = tmp_path / "upstream"
    repo.mkdir()
    git(repo, "init", "-q")
    write(repo / "megatron/core/foo.py", FOO)
    write(repo / "megatron/core/bar.py", "def bar():\n    return 1\n")
    write(repo / "docs/old name.md", "# Old\n\ntext\n")
    write(repo / "to_delete.txt", "bye\n")
    write(repo / "README.md", "upstream readme\n")
    write(repo / "run.sh", "echo run\n")
    write(repo / "assets/logo.bin", BINARY)
    commit_all(repo, "base")
    return repo


def superproject(tmp_path: Path, name: str, upstream: Path) -> Path:
    """A FlagScale-like superproject with a plain clone of ``upstream`` in third_party/."""
    root = tmp_path / name
    root.mkdir()
    git(root, "init", "-q")
    git(tmp_path, "clone", "-q", str(upstream), str(root / CHECKOUT))
    return root


@pytest.fixture
def root(tmp_path: Path, upstream: Path) -> Path:
    return superproject(tmp_path, "flagscale", upstream)


def edit_backend(root: Path) -> None:
    """Record the base, then make every kind of change: committed, staged, unstaged, untracked,
    renamed, deleted, binary, mode."""
    assert patch(root) == 0
    checkout = root / CHECKOUT
    write(checkout / "README.md", "flagscale readme\n")
    commit_all(checkout, "committed on top of the base")
    write(checkout / "megatron/core/foo.py", FOO.replace("line 20\n", "line 20 (flagscale)\n"))
    git(checkout, "add", "megatron/core/foo.py")
    write(checkout / "megatron/core/bar.py", "def bar():\n    return 2\n")
    git(checkout, "mv", "docs/old name.md", "docs/new name.md")
    write(checkout / "docs/new name.md", "# New\n\ntext\n")
    (checkout / "to_delete.txt").unlink()
    write(checkout / "megatron/new module.py", "NEW = True\n")
    write(checkout / "assets/logo.bin", BINARY[::-1])
    write(checkout / "assets/weights.bin", b"\x00\x01\xff" * 100)
    (checkout / "run.sh").chmod(0o755)


EXPECTED_PATHS = {
    "README.md",
    "megatron/core/foo.py",
    "megatron/core/bar.py",
    "docs/old name.md",
    "docs/new name.md",
    "to_delete.txt",
    "megatron/new module.py",
    "assets/logo.bin",
    "assets/weights.bin",
    "run.sh",
}


def tree_state(directory: Path) -> dict[str, tuple[bytes, bool]]:
    """Every file below ``directory`` (outside .git) with its bytes and executable bit."""
    files = (p for p in directory.rglob("*") if p.is_file() and ".git" not in p.relative_to(directory).parts)
    return {p.relative_to(directory).as_posix(): (p.read_bytes(), bool(p.stat().st_mode & stat.S_IXUSR)) for p in files}


def patch(root: Path, *extra: str) -> int:
    return main_patch(["--backend", "megatron", "--repo-root", str(root), *extra])


def unpatch(root: Path, *extra: str) -> int:
    return main_unpatch(["--backend", "Megatron-LM", "--repo-root", str(root), *extra])


def test_backend_names_are_case_insensitive_with_aliases() -> None:
    cases = {
        "megatron": "Megatron-LM",
        "MEGATRON-LM": "Megatron-LM",
        "VLLM": "vllm",
        "llama_cpp": "llama.cpp",
        "Llama.CPP": "llama.cpp",
        "SGLang": "sglang",
    }
    assert {name: canonical_name(name) for name in cases} == cases
    with pytest.raises(UnknownBackendError, match="use one of: " + ", ".join(BACKENDS)):
        canonical_name("tensorflow")


def test_patch_writes_one_patch_per_file_and_records_base(
    root: Path, upstream: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = git(upstream, "rev-parse", "HEAD")
    edit_backend(root)
    assert patch(root) == 0
    stored = patchset.load_patch_set(root / PATCHES)
    assert set(stored) == EXPECTED_PATHS
    assert (root / PATCHES / "megatron/core/foo.py.patch").is_file()
    assert b"deleted file mode" in stored["docs/old name.md"]
    assert b"new file mode" in stored["docs/new name.md"]
    assert b"GIT binary patch" in stored["assets/weights.bin"]
    assert b"new mode 100755" in stored["run.sh"]
    record = yaml.safe_load((root / PATCHES / "base.yaml").read_text())
    assert record == {"commit": base, "url": str(upstream)}
    out = capsys.readouterr().out
    assert "10 patches added, 0 changed, 0 removed" in out
    assert "3 added" in out and "2 deleted" in out


def test_round_trip_gives_byte_identical_files(tmp_path: Path, root: Path, upstream: Path) -> None:
    edit_backend(root)
    assert patch(root) == 0
    fresh = superproject(tmp_path, "fresh", upstream)
    shutil.copytree(root / PATCHES, fresh / PATCHES)
    assert unpatch(fresh) == 0
    assert tree_state(fresh / CHECKOUT) == tree_state(root / CHECKOUT)
    # Patching the fresh checkout again reproduces exactly the same patch files.
    assert patch(fresh) == 0
    assert tree_state(fresh / PATCHES) == tree_state(root / PATCHES)


def test_second_patch_run_reports_changes_and_removals(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkout = root / CHECKOUT
    edit_backend(root)
    assert patch(root) == 0
    write(checkout / "to_delete.txt", "bye\n")  # undo a deletion -> its patch goes away
    write(checkout / "megatron/core/bar.py", "def bar():\n    return 3\n")
    write(checkout / "megatron/extra.py", "X = 1\n")
    capsys.readouterr()
    assert patch(root) == 0
    out = capsys.readouterr().out
    assert "1 patches added, 1 changed, 1 removed" in out
    assert "removed  to_delete.txt.patch" in out
    assert not (root / PATCHES / "to_delete.txt.patch").exists()
    assert (root / PATCHES / "megatron/extra.py.patch").is_file()


def test_unpatch_twice_is_allowed_when_the_work_is_in_the_patches(root: Path) -> None:
    edit_backend(root)
    assert patch(root) == 0
    before = tree_state(root / CHECKOUT)
    assert unpatch(root) == 0
    assert unpatch(root) == 0
    assert tree_state(root / CHECKOUT) == before


def test_dirty_checkout_is_refused_and_left_untouched(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkout = root / CHECKOUT
    edit_backend(root)
    assert patch(root) == 0
    write(checkout / "megatron/core/bar.py", "unsaved work\n")
    write(checkout / "scratch.txt", "notes\n")
    before = tree_state(checkout)
    capsys.readouterr()
    assert unpatch(root) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: third_party/Megatron-LM has uncommitted changes")
    assert "megatron/core/bar.py" in err and "scratch.txt" in err and "--force" in err
    assert tree_state(checkout) == before


def test_force_saves_the_work_to_a_backup_branch_first(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkout = root / CHECKOUT
    edit_backend(root)
    assert patch(root) == 0
    write(checkout / "megatron/core/bar.py", "unsaved work\n")
    write(checkout / "scratch.txt", "notes\n")
    capsys.readouterr()
    assert unpatch(root, "--force") == 0
    out = capsys.readouterr().out
    branch = out.split("to branch ", 1)[1].split()[0]
    assert branch.startswith("flagscale-backup/")
    assert git(checkout, "show", f"{branch}:megatron/core/bar.py") == "unsaved work"
    assert git(checkout, "show", f"{branch}:scratch.txt") == "notes"
    assert (checkout / "megatron/core/bar.py").read_text() == "def bar():\n    return 2\n"
    assert not (checkout / "scratch.txt").exists()


def test_commits_only_a_detached_head_holds_count_as_work(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkout = root / CHECKOUT
    assert patch(root) == 0  # records the base, no patches
    git(checkout, "checkout", "-q", "--detach")
    write(checkout / "megatron/core/bar.py", "committed but unreferenced\n")
    commit_all(checkout, "detached work")
    head = git(checkout, "rev-parse", "HEAD")
    assert unpatch(root) == 1
    assert "1 commit(s) on a detached HEAD" in capsys.readouterr().err
    assert git(checkout, "rev-parse", "HEAD") == head


def test_failed_patch_run_leaves_previous_set_intact(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    checkout = root / CHECKOUT
    edit_backend(root)
    assert patch(root) == 0
    before = tree_state(root / PATCHES)
    write(checkout / "megatron/core/bar.py", "more work\n")
    calls = []

    def failing_write(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    monkeypatch.setattr(patchset, "write_file", failing_write)
    capsys.readouterr()
    assert patch(root) == 1
    assert "previous patch files are unchanged" in capsys.readouterr().err
    assert tree_state(root / PATCHES) == before
    assert sorted(p.name for p in (root / PATCHES).parent.iterdir()) == [BACKEND]


def new_upstream_commit(upstream: Path, checkout: Path, path: str, text: str) -> str:
    write(upstream / path, text)
    commit = commit_all(upstream, f"upstream changes {path}")
    git(checkout, "fetch", "-q", "origin")
    return commit


def test_new_base_with_conflict_names_file_and_hunk_and_changes_nothing(
    root: Path, upstream: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkout = root / CHECKOUT
    edit_backend(root)
    assert patch(root) == 0
    assert unpatch(root) == 0
    base_yaml = (root / PATCHES / "base.yaml").read_text()
    new = new_upstream_commit(upstream, checkout, "megatron/core/foo.py", FOO.replace("line 20\n", "line twenty\n"))
    before, head = tree_state(checkout), git(checkout, "rev-parse", "HEAD")
    capsys.readouterr()
    assert unpatch(root, "--backend-commit", new) == 1
    err = capsys.readouterr().err
    assert "1 of 10 patches do not apply" in err
    assert "megatron/core/foo.py" in err and "failing hunk:" in err and "-line 20" in err
    assert "Traceback" not in err
    assert tree_state(checkout) == before and git(checkout, "rev-parse", "HEAD") == head
    assert (root / PATCHES / "base.yaml").read_text() == base_yaml


def test_reject_applies_the_rest_and_patch_refuses_leftover_rej(
    root: Path, upstream: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkout = root / CHECKOUT
    edit_backend(root)
    assert patch(root) == 0
    assert unpatch(root) == 0
    new = new_upstream_commit(upstream, checkout, "megatron/core/foo.py", FOO.replace("line 20\n", "line twenty\n"))
    assert unpatch(root, "--backend-commit", new, "--reject") == 1
    assert (checkout / "megatron/core/foo.py.rej").is_file()
    assert (checkout / "megatron/core/bar.py").read_text() == "def bar():\n    return 2\n"
    assert yaml.safe_load((root / PATCHES / "base.yaml").read_text())["commit"] == new
    capsys.readouterr()
    assert patch(root) == 1
    assert "foo.py.rej" in capsys.readouterr().err
    (checkout / "megatron/core/foo.py.rej").unlink()
    assert patch(root) == 0
    assert "megatron/core/foo.py" not in patchset.load_patch_set(root / PATCHES)


def test_backend_commit_moves_to_a_new_base_that_the_patches_fit(root: Path, upstream: Path) -> None:
    checkout = root / CHECKOUT
    edit_backend(root)
    assert patch(root) == 0
    expected = tree_state(checkout)
    new = new_upstream_commit(upstream, checkout, "unrelated.txt", "upstream moved on\n")
    assert unpatch(root, "--backend-commit", new[:10]) == 0
    assert git(checkout, "rev-parse", "HEAD") == new
    assert yaml.safe_load((root / PATCHES / "base.yaml").read_text())["commit"] == new
    assert tree_state(checkout) == {**expected, "unrelated.txt": (b"upstream moved on\n", False)}


def add_submodule(root: Path, upstream: Path) -> None:
    git(root, "submodule", "add", "-q", str(upstream), CHECKOUT.as_posix())
    git(root, "commit", "-q", "-m", "add backend")


def test_submodule_base_is_its_gitlink(tmp_path: Path, upstream: Path) -> None:
    base = git(upstream, "rev-parse", "HEAD")
    root = tmp_path / "super"
    root.mkdir()
    git(root, "init", "-q")
    add_submodule(root, upstream)
    edit_backend(root)
    assert patch(root) == 0
    assert not (root / PATCHES / "base.yaml").exists()
    assert set(patchset.load_patch_set(root / PATCHES)) == EXPECTED_PATHS
    fresh = tmp_path / "fresh-super"
    fresh.mkdir()
    git(fresh, "init", "-q")
    add_submodule(fresh, upstream)
    shutil.copytree(root / PATCHES, fresh / PATCHES)
    assert unpatch(fresh) == 0
    assert tree_state(fresh / CHECKOUT) == tree_state(root / CHECKOUT)
    new = new_upstream_commit(upstream, fresh / CHECKOUT, "unrelated.txt", "x\n")
    assert git(fresh, "ls-files", "--stage", CHECKOUT.as_posix()).split()[1] == base
    assert unpatch(fresh, "--backend-commit", new) == 0
    assert git(fresh, "ls-files", "--stage", CHECKOUT.as_posix()).split()[1] == new


def test_plain_directory_is_never_treated_as_a_checkout(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(root / CHECKOUT)
    write(root / CHECKOUT / "file.py", "not a git checkout\n")
    write(root / "superproject.txt", "x\n")
    commit_all(root, "superproject content")
    assert unpatch(root, "--backend-commit", "HEAD") == 1
    assert "is not a git checkout of its own" in capsys.readouterr().err
    assert (root / CHECKOUT / "file.py").read_text() == "not a git checkout\n"
    assert git(root, "status", "--porcelain", "--untracked-files=no") == ""


def test_unpatch_without_any_recorded_base_says_how_to_record_one(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert unpatch(root) == 1
    err = capsys.readouterr().err
    assert "no base commit is recorded" in err and "--backend-commit" in err


def run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(REPO_ROOT / "tools" / "patch" / script), *args]
    return subprocess.run(argv, capture_output=True, text=True, check=False, cwd="/")


def test_cli_user_errors_are_one_message_without_traceback(tmp_path: Path) -> None:
    unknown = run_script("unpatch.py", "--backend", "nope", "--repo-root", str(tmp_path))
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("error: unknown backend 'nope'") and "Traceback" not in unknown.stderr
    missing = run_script("patch.py", "--backend", "vllm", "--repo-root", str(tmp_path))
    assert missing.returncode == 1
    assert "git submodule update --init third_party/vllm" in missing.stderr
    assert "Traceback" not in missing.stderr and missing.stderr.count("\n") == 1


def test_a_swap_killed_midway_is_recovered_from_the_old_set(root: Path) -> None:
    edit_backend(root)
    assert patch(root) == 0
    before = tree_state(root / PATCHES)
    backends_dir = (root / PATCHES).parent
    (root / PATCHES).rename(backends_dir / f".{BACKEND}.old-1234abcd")
    write(backends_dir / f".{BACKEND}.new-5678" / "half-written.patch", "partial")
    assert unpatch(root) == 0
    assert tree_state(root / PATCHES) == before
    assert sorted(p.name for p in backends_dir.iterdir()) == [BACKEND]
