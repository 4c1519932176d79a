"""Tests cannot go green by not running: a test whose dependency (sshd, vLLM, network namespaces, Slurm)
is missing skips on a developer's machine but fails under CI (CI=true), through one helper."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

TESTS = REPO / "tests"
REQUIRES = TESTS / "helpers" / "requires.py"

MODULE_SAMPLE = '''
from tests.helpers.requires import requirement

_sshd = requirement(False, "needs sshd (module)")


def test_module_requirement():
    pass
'''

TEST_SAMPLE = '''
from tests.helpers.requires import need, needs


@needs(False, "needs vLLM (decorator)")
def test_decorated():
    pass


def test_inline():
    need(False, "needs network namespaces (inline)")
'''


def _pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_module_sample.py").write_text(MODULE_SAMPLE)
    (tmp_path / "test_test_sample.py").write_text(TEST_SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(REPO)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "."],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_missing_dependency_skips_here_and_fails_under_ci(tmp_path: Path) -> None:
    local = _pytest(tmp_path, None)
    assert local.returncode == 0 and "3 skipped" in local.stdout, local.stdout
    ci = _pytest(tmp_path, "true")
    assert ci.returncode != 0 and "2 failed, 1 error" in ci.stdout, ci.stdout  # the module's fixture: an error
    for why in ("needs sshd (module)", "needs vLLM (decorator)", "needs network namespaces (inline)"):
        assert why in ci.stdout


def test_no_test_skips_for_a_dependency_outside_the_helper() -> None:
    """Every skip for sshd, vLLM, network namespaces or Slurm goes through tests/helpers/requires.py."""
    pattern = re.compile(r"pytest\.skip\(|skipif\(")
    offenders = []
    for path in TESTS.rglob("*.py"):
        if path == REQUIRES:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            context = " ".join(path.read_text().splitlines()[number - 1:number + 2]).lower()
            if pattern.search(line) and re.search(r"sshd|openssh|vllm|namespace|netns|slurm", context):
                offenders.append(f"{path.relative_to(REPO)}:{number}")
    assert not offenders, offenders
