"""FlagScale entry point:

    python run.py --config-path examples/tiny_gpt/conf --config-name train action=run

Actions: run (detached), dryrun, test (foreground), stop, query, auto_tune.
Any Hydra override works: train.model.num_layers=4, experiment.exp_dir=/tmp/x, +train.system.x=1.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from flagscale.config.loader import ConfigSource
from flagscale.main import HYDRA_QUIET, hydra_choices, hydra_quiet_overrides, run_hydra_main, run_job


@hydra.main(version_base=None, config_path=None, config_name=None)
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    config_dir = next(
        (Path(s.path.removeprefix("file://")) for s in hydra_cfg.runtime.config_sources
         if s.provider == "main" and s.schema == "file"),
        None,
    )
    overrides = tuple(o for o in hydra_cfg.overrides.task if o not in HYDRA_QUIET)
    source = ConfigSource(config_dir=config_dir, config_name=hydra_cfg.job.config_name, overrides=overrides,
                          choices=hydra_choices(hydra_cfg.runtime.choices))
    sys.exit(run_job(cfg, source))


if __name__ == "__main__":
    sys.argv.extend(hydra_quiet_overrides(sys.argv[1:]))
    run_hydra_main(main, sys.argv[1:])
