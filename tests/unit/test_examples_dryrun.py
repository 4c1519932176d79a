"""Every experiment YAML under examples/ dry-runs as a user would type it: exit 0, scripts written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_py
from tests.helpers.jobs import dryrun_scripts

EXPERIMENTS = sorted(
    path for path in REPO.glob("examples/*/conf/*.yaml")
    if isinstance(data := yaml.safe_load(path.read_text()), dict) and "experiment" in data
)


def test_examples_are_found() -> None:
    names = {f"{p.parent.parent.name}/{p.stem}" for p in EXPERIMENTS}
    assert {"tiny_gpt/train", "aquila/train", "aquila/train_cluster", "tiny_gpt/serve"} <= names


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_example_dryruns(config: Path, tmp_path: Path) -> None:
    proc = run_py("--config-path", str(config.parent.relative_to(REPO)), "--config-name", config.stem,
                  "action=dryrun", f"experiment.exp_dir={tmp_path}", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "dryrun: nothing was started." in proc.stdout
    assert list(dryrun_scripts(tmp_path).glob("*.sh")), proc.stdout
    assert not (tmp_path / "job.json").exists()
