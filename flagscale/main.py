"""The shared entry for run.py and the `flagscale` CLI: a composed config in, an exit code out.
User errors become one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from flagscale.config.loader import ConfigSource, load_job_config
from flagscale.exceptions import ConfigError, FlagScaleError

# Hydra writes no output folder or log of its own: FlagScale keeps the composed config per run.
HYDRA_QUIET = ("hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none", "hydra/hydra_logging=none")


def run_job(cfg: DictConfig, source: ConfigSource) -> int:
    from flagscale.runner.actions import dispatch

    try:
        return dispatch(load_job_config(cfg, source))
    except FlagScaleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def compose_config(config_dir: Path, config_name: str, overrides: list[str]) -> tuple[DictConfig, ConfigSource]:
    """Compose like run.py does (for the CLI, which has no @hydra.main)."""
    if not (config_dir / f"{config_name}.yaml").is_file():
        raise ConfigError(f"no config {config_dir / (config_name + '.yaml')}")
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot compose {config_dir}/{config_name}.yaml: {err}".splitlines()[0]) from None
    return cfg, ConfigSource(config_dir=config_dir, config_name=config_name, overrides=tuple(overrides))
