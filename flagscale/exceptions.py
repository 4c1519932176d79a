"""Typed errors. Every FlagScaleError is a user-facing message: run.py and the CLI print it
as one line (no traceback) and exit non-zero."""


class FlagScaleError(Exception):
    """An error the user can fix; its message names the file/host and the fix."""


class ConfigError(FlagScaleError):
    """A bad YAML key or value, or an inconsistent setting."""


class HostfileError(ConfigError):
    """A missing hostfile or a malformed line in it."""


class LaunchError(FlagScaleError):
    """A host could not start its part of the job (nothing is left running)."""


class JobRecordError(FlagScaleError):
    """No job record, or an unreadable one, where stop/query/logs expect it."""


class HostsNotReached(LaunchError):
    """Hosts that did not answer when a launch began (nothing was started); `hosts` names them."""

    def __init__(self, message: str, hosts: list[str]) -> None:
        super().__init__(message)
        self.hosts = hosts
