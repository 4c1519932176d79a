"""Argument parsing and error reporting shared by ``patch.py`` and ``unpatch.py``."""

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tools.patch.backends import BACKENDS, Backend, resolve_backend
from tools.patch.errors import PatchToolError
from tools.patch.export import PatchOptions, export
from tools.patch.restore import UnpatchOptions, unpatch

DEFAULT_REPO_ROOT = Path(__file__).resolve().parents[2]


def _common_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--backend",
        action="append",
        required=True,
        metavar="NAME",
        help=f"backend to work on, case-insensitive, repeatable: {', '.join(BACKENDS)} (aliases: megatron, llama_cpp)",
    )
    parser.add_argument(
        "--backend-commit",
        metavar="SHA",
        help="use this commit as the new base (must be present in the checkout; one backend only)",
    )
    parser.add_argument(
        "--repo-root",
        type=Path,
        default=DEFAULT_REPO_ROOT,
        help=f"the FlagScale superproject holding third_party/ and flagscale/backends/ (default: {DEFAULT_REPO_ROOT})",
    )
    return parser


def patch_parser() -> argparse.ArgumentParser:
    """The ``patch.py`` command line."""
    return _common_parser(
        "Write the changes in third_party/<Backend> (relative to its base commit) as patch files "
        "under flagscale/backends/<Backend>/, replacing the previous set."
    )


def unpatch_parser() -> argparse.ArgumentParser:
    """The ``unpatch.py`` command line."""
    parser = _common_parser(
        "Reset third_party/<Backend> to its base commit and apply the patches from flagscale/backends/<Backend>/."
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="proceed over work the patch files do not hold, after saving it to a flagscale-backup/<time> branch",
    )
    parser.add_argument(
        "--reject",
        action="store_true",
        help="apply the patches that apply and leave <file>.rej for failing hunks (records the base)",
    )
    return parser


def main_patch(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tools/patch/patch.py``."""
    args = patch_parser().parse_args(argv)
    options = PatchOptions(backend_commit=args.backend_commit)
    return _run(args, lambda backend: export(backend, options))


def main_unpatch(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tools/patch/unpatch.py``."""
    args = unpatch_parser().parse_args(argv)
    options = UnpatchOptions(backend_commit=args.backend_commit, force=args.force, reject=args.reject)
    return _run(args, lambda backend: unpatch(backend, options))


def _run(args: argparse.Namespace, action: Callable[[Backend], object]) -> int:
    try:
        for backend in _backends(args):
            action(backend)
    except PatchToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _backends(args: argparse.Namespace) -> list[Backend]:
    repo_root = args.repo_root.resolve()
    if not repo_root.is_dir():
        raise PatchToolError(f"--repo-root {args.repo_root} is not a directory; point it at the FlagScale checkout.")
    backends = list({b.name: b for b in (resolve_backend(name, repo_root) for name in args.backend)}.values())
    if args.backend_commit and len(backends) > 1:
        raise PatchToolError("--backend-commit applies to one backend; run once per backend.")
    return backends
