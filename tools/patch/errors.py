"""Typed errors of the patch tools; each message says what to do about it."""


class PatchToolError(Exception):
    """A user-facing error: the CLI prints its message and exits non-zero, without a traceback."""


class UnknownBackendError(PatchToolError):
    """The backend name matches no known backend or alias."""


class MissingCheckoutError(PatchToolError):
    """``third_party/<Backend>`` is absent, empty, or not a git checkout of its own."""


class BaseCommitError(PatchToolError):
    """The base commit is unrecorded, malformed, recorded twice, or not present in the checkout."""


class DirtyCheckoutError(PatchToolError):
    """The checkout holds work that the patch files do not capture, and ``--force`` was not given."""


class PatchApplyError(PatchToolError):
    """One or more patch files do not apply to the base commit."""


class PatchSetError(PatchToolError):
    """The patch set could not be built or written (leftover .rej files, I/O errors, ...)."""


class GitError(PatchToolError):
    """A git command failed; the message carries the command and git's own words."""
