"""Rendered per-host scripts compared with golden files (tests/golden/*.sh).
Regenerate after an intended change with FLAGSCALE_UPDATE_GOLDEN=1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from flagscale.config.loader import load_job_config, select_hosts
from flagscale.main import compose_config
from flagscale.runner.base import PlanContext, runner_for
from flagscale.runner.plan import render_script
from tests.conftest import REPO

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def _render(example: str, name: str, overrides: list[str]) -> dict[str, str]:
    cfg, source = compose_config(REPO / "examples" / example / "conf", name, [*overrides, "action=dryrun"])
    job = load_job_config(cfg, source)
    ctx = PlanContext(job=job, hosts=select_hosts(job), run_id="RUNID", master_port=29555)
    plan = runner_for("train").plan(ctx)
    return {spec.host.slug: _normalize(render_script(plan, spec)) for spec in plan.processes}


def _normalize(text: str) -> str:
    for path, name in ((sys.executable, "<PYTHON>"), (str(Path(sys.executable).parent), "<VENV_BIN>"),
                       (str(REPO), "<REPO>"), (os.getcwd(), "<CWD>")):
        text = text.replace(path, name)
    return text


@pytest.mark.parametrize(
    ("example", "name", "overrides"),
    [
        ("tiny_gpt", "train", ["experiment.exp_dir=/exp/tiny"]),
        ("aquila", "train", ["experiment.exp_dir=/exp/aquila"]),
        # upstream style: runner.docker, per-node/per-type envs, torchrun options passed through
        ("aquila", "train_cluster", ["experiment.exp_dir=/exp/aquila_cluster"]),
    ],
)
def test_rendered_scripts_match_golden(example: str, name: str, overrides: list[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the scripts cd into the launching directory
    for slug, text in _render(example, name, overrides).items():
        golden = GOLDEN / f"{example}_{name}_{slug}.sh"
        if os.environ.get("FLAGSCALE_UPDATE_GOLDEN"):
            golden.write_text(text)
        assert golden.is_file(), f"missing {golden}; run with FLAGSCALE_UPDATE_GOLDEN=1"
        assert text == golden.read_text(), f"{golden} differs from the rendered script"
