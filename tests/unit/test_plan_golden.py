"""Rendered per-host scripts compared with golden files (tests/golden/*.sh).
Regenerate after an intended change with FLAGSCALE_UPDATE_GOLDEN=1."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

from flagscale.config.loader import load_job_config, select_hosts
from flagscale.main import compose_config
from flagscale.runner.base import PlanContext, runner_for
from flagscale.spec.plan import render_script
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


def _options(argv: list[str]) -> dict[str, list[str]]:
    """`--flag v1 v2 --other` as {flag: [values]}, argparse's view (the last setting of a flag wins)."""
    options: dict[str, list[str]] = {}
    current = None
    for token in argv:
        if token.startswith("--"):
            current = token
            options[current] = []
        elif current is not None:
            options[current].append(token)
    return options


def test_aquila_megatron_arguments_match_upstream_flag_for_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our dryrun of examples/aquila (upstream's 7B YAML) gives the training program the arguments upstream's run.py
    gives it, value for value; only --metrics-dir is ours (where this program writes metrics.jsonl)."""
    monkeypatch.chdir(REPO)
    overrides = ["experiment.exp_dir=/exp/aq", "action=dryrun"]
    cfg, source = compose_config(REPO / "examples/aquila/conf", "train", overrides)
    job = load_job_config(cfg, source)
    ctx = PlanContext(job=job, hosts=select_hosts(job), run_id="RUNID", master_port=29555)
    (spec,) = runner_for("train").plan(ctx).processes
    ours = _options(spec.argv[spec.argv.index(str(REPO / "flagscale/train/train_gpt.py")) + 1:])
    text = (GOLDEN / "upstream_aquila_train_megatron_args.txt").read_text().replace("<EXP_DIR>", "/exp/aq")
    upstream = _options(shlex.split(text.splitlines()[-1]))
    assert ours.pop("--metrics-dir") == ["/exp/aq/logs/RUNID"]
    assert ours == upstream
