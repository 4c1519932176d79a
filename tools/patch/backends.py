"""Known vendored backends, their name aliases, and where their checkout and patches live."""

from dataclasses import dataclass
from pathlib import Path

from tools.patch.errors import UnknownBackendError

THIRD_PARTY = "third_party"
PATCH_ROOT = Path("flagscale") / "backends"

# Canonical name -> accepted aliases (compared case-insensitively). Add a backend here.
BACKENDS: dict[str, tuple[str, ...]] = {
    "Megatron-LM": ("megatron", "megatron-lm", "megatron_lm", "megatronlm"),
    "vllm": ("vllm",),
    "llama.cpp": ("llama.cpp", "llama_cpp", "llama-cpp", "llamacpp"),
    "sglang": ("sglang",),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Backend:
    """One vendored backend inside a FlagScale superproject."""

    name: str
    """Canonical name, also the directory name under third_party/ and flagscale/backends/."""
    repo_root: Path
    """The FlagScale superproject root."""

    @property
    def checkout_rel(self) -> str:
        """The checkout path relative to the superproject, in git's '/' form."""
        return f"{THIRD_PARTY}/{self.name}"

    @property
    def checkout(self) -> Path:
        """``third_party/<name>``: the backend's git checkout (submodule or plain clone)."""
        return self.repo_root / THIRD_PARTY / self.name

    @property
    def patch_dir(self) -> Path:
        """``flagscale/backends/<name>``: one ``<path>.patch`` per changed backend file."""
        return self.repo_root / PATCH_ROOT / self.name


def canonical_name(name: str) -> str:
    """Map a user-typed backend name or alias to its canonical spelling."""
    wanted = name.strip().lower()
    for canonical, aliases in BACKENDS.items():
        if wanted == canonical.lower() or wanted in aliases:
            return canonical
    known = ", ".join(BACKENDS)
    raise UnknownBackendError(
        f"unknown backend {name!r}; use one of: {known} "
        "(aliases such as 'megatron' or 'llama_cpp' work too). "
        "To add a backend, register it in tools/patch/backends.py."
    )


def resolve_backend(name: str, repo_root: Path) -> Backend:
    """The ``Backend`` for ``name`` inside the superproject at ``repo_root``."""
    return Backend(name=canonical_name(name), repo_root=repo_root)
