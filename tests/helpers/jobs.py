"""In-process jobs for tests that inject a failure into the real launcher with monkeypatch: the job
config composed as run.py composes it, and the light per-host program (tests/helpers/sleeper.py)."""

from __future__ import annotations

import time
from pathlib import Path

from flagscale.config.loader import JobConfig, load_job_config
from flagscale.main import compose_config

HELPERS = Path(__file__).resolve().parent
SLEEPER = HELPERS / "sleeper.py"
TINY_CONF_DIR = HELPERS.parents[1] / "examples" / "tiny_gpt" / "conf"


def tiny_job(*overrides: str, action: str = "run") -> JobConfig:
    """examples/tiny_gpt/conf/train.yaml with `overrides`, validated as run.py validates it."""
    cfg, source = compose_config(TINY_CONF_DIR, "train", [*overrides, f"action={action}"])
    return load_job_config(cfg, source)


def sleeper_overrides(exp: Path) -> list[str]:
    """The sleeper once per host instead of torchrun; each writes `<exp>/sleepers/<pid>.json`."""
    return ["experiment.runner.nnodes=null", "experiment.runner.nproc_per_node=1", "experiment.runner.backend=direct",
            f"experiment.task.entrypoint={SLEEPER}", f"+experiment.envs.SLEEPER_DIR={exp / 'sleepers'}"]


def wait_for(condition, timeout: float = 15, what: str = "condition") -> None:
    """Poll `condition()` until true; fail naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def dryrun_scripts(exp: Path) -> Path:
    """The scripts folder of the one dryrun (or launch) made in `exp`: `<exp>/logs/<run id>/scripts`."""
    found = sorted((Path(exp) / "logs").glob("*/scripts"))
    assert len(found) == 1, f"expected one run's scripts under {exp}/logs, found {[str(p) for p in found]}"
    return found[0]
