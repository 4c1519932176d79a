"""The base commit of a backend, recorded in exactly one place.

* A git submodule: its gitlink (the commit the superproject index points at).
* A plain checkout: ``flagscale/backends/<Backend>/base.yaml`` with ``commit:`` and ``url:``.
"""

import os
import re
import tempfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import yaml

from tools.patch.backends import Backend
from tools.patch.errors import BaseCommitError
from tools.patch.gitcmd import run_git

BASE_FILE = "base.yaml"
_GITLINK_MODE = "160000"
_SHA_RE = re.compile(r"^[0-9a-f]{7,64}$")


class BaseSource(Enum):
    """Where a backend's base commit is recorded."""

    SUBMODULE = "submodule gitlink"
    BASE_YAML = BASE_FILE


@dataclass(frozen=True, slots=True, kw_only=True)
class BaseRecord:
    """A recorded base commit."""

    commit: str
    """The commit sha as recorded (a submodule's gitlink is always the full sha)."""
    url: str | None
    """Upstream URL (base.yaml only); informational."""
    source: BaseSource


def base_file(backend: Backend) -> Path:
    """Path of the backend's base.yaml (used for plain checkouts only)."""
    return backend.patch_dir / BASE_FILE


def submodule_pointer(backend: Backend) -> str | None:
    """The gitlink sha of ``third_party/<Backend>`` in the superproject index, or None."""
    args = ["ls-files", "--stage", "-z", "--", backend.checkout_rel]
    proc = run_git(backend.repo_root, args, check=False)
    if proc.returncode != 0:
        return None
    for entry in proc.stdout.decode("utf-8", "surrogateescape").split("\0"):
        meta, _, path = entry.partition("\t")
        fields = meta.split()
        if path == backend.checkout_rel and len(fields) == 3 and fields[0] == _GITLINK_MODE:
            return fields[1]
    return None


def read_base(backend: Backend) -> BaseRecord | None:
    """The recorded base of ``backend``, or None when nothing is recorded yet."""
    pointer = submodule_pointer(backend)
    from_yaml = read_base_yaml(base_file(backend))
    if pointer is not None and from_yaml is not None:
        raise BaseCommitError(
            f"{backend.checkout_rel} is a git submodule, whose gitlink records its base, but "
            f"{_rel(backend, base_file(backend))} records one too; delete that base.yaml."
        )
    if pointer is not None:
        return BaseRecord(commit=pointer, url=None, source=BaseSource.SUBMODULE)
    return from_yaml


def read_base_yaml(path: Path) -> BaseRecord | None:
    """Parse a base.yaml (``commit:`` required, ``url:`` optional); None if the file is absent."""
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise BaseCommitError(f"{path} is not valid YAML ({exc}); fix or delete it.") from exc
    if not isinstance(data, dict) or set(data) - {"commit", "url"}:
        raise BaseCommitError(f"{path} must be a mapping with only the keys 'commit' and 'url'.")
    return BaseRecord(
        commit=_valid_commit(path, data.get("commit")),
        url=_valid_url(path, data.get("url")),
        source=BaseSource.BASE_YAML,
    )


def _valid_commit(path: Path, commit: object) -> str:
    if not isinstance(commit, str) or not _SHA_RE.match(commit.lower()):
        raise BaseCommitError(
            f"{path}: 'commit' must be a quoted hex commit sha (got {commit!r}); write it as commit: \"<sha>\"."
        )
    return commit.lower()


def _valid_url(path: Path, url: object) -> str | None:
    if url is not None and not isinstance(url, str):
        raise BaseCommitError(f"{path}: 'url' must be a string or empty (got {url!r}).")
    return url or None


def base_yaml_bytes(commit: str, url: str | None) -> bytes:
    """The content of a base.yaml for ``commit`` and ``url``."""
    header = "# Base commit of the vendored checkout; read and written by tools/patch.\n"
    body = yaml.safe_dump({"commit": commit, "url": url}, sort_keys=False, default_flow_style=False)
    return (header + body).encode("utf-8")


def write_base_yaml(path: Path, commit: str, url: str | None) -> None:
    """Atomically (temp file + rename) write a base.yaml."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(base_yaml_bytes(commit, url))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def record_submodule_pointer(backend: Backend, commit: str) -> None:
    """Point the submodule's gitlink in the superproject index at ``commit`` (staged, not committed)."""
    cacheinfo = f"{_GITLINK_MODE},{commit},{backend.checkout_rel}"
    run_git(backend.repo_root, ["update-index", "--cacheinfo", cacheinfo])


def origin_url(checkout: Path) -> str | None:
    """The checkout's ``origin`` URL, or None when it has no origin remote."""
    proc = run_git(checkout, ["remote", "get-url", "origin"], check=False)
    url = proc.stdout.decode("utf-8", "surrogateescape").strip()
    return url if proc.returncode == 0 and url else None


def _rel(backend: Backend, path: Path) -> str:
    return path.relative_to(backend.repo_root).as_posix()
