"""One rule for tests whose dependency may be missing (sshd, vLLM, network namespaces, Slurm): on a
developer's machine they skip, saying why; under CI (CI=true) they fail, so a suite cannot go green by
not running them. Every such test goes through here:

    need(condition, why)                inside a test or fixture
    @needs(condition, why)              on a test function
    _x = requirement(condition, why)    in a module: every test of it (an autouse module fixture, so it
                                        runs before the module's other fixtures start anything)
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

F = TypeVar("F", bound=Callable[..., Any])


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def need(condition: bool, why: str) -> None:
    """Carry on if `condition`; else skip (here) or fail (under CI) naming `why`."""
    if condition:
        return
    if under_ci():
        pytest.fail(f"CI=true and a dependency is missing: {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def needs(condition: bool, why: str) -> Callable[[F], F]:
    """Decorate a test that needs `condition` (checked when the test runs, after its fixtures)."""

    def decorate(test: F) -> F:
        @functools.wraps(test)
        def checked(*args: Any, **kwargs: Any) -> Any:
            need(condition, why)
            return test(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return decorate


def requirement(condition: bool, why: str) -> Any:
    """An autouse module fixture: each test of the module needs `condition`. Assign it to a module name."""
    name = "_requires_" + re.sub(r"\W+", "_", why)[:40]

    @pytest.fixture(scope="module", autouse=True, name=name)
    def _requirement() -> None:
        need(condition, why)

    return _requirement
