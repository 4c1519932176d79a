"""The shared entry for run.py and the `flagscale` CLI: a composed config in, an exit code out.
User errors become one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from flagscale.config.loader import ConfigSource, load_job_config
from flagscale.exceptions import ConfigError, FlagScaleError

# Hydra writes no log of its own, and no output folder unless the YAML names one (`hydra.run.dir`, as
# upstream's YAMLs do): FlagScale keeps the composed config per run under <exp_dir>/logs/<run id>.
HYDRA_LOGS_OFF = ("hydra/job_logging=none", "hydra/hydra_logging=none")
HYDRA_NO_OUTPUT = ("hydra.output_subdir=null", "hydra.run.dir=.")
HYDRA_QUIET = HYDRA_NO_OUTPUT + HYDRA_LOGS_OFF


def hydra_quiet_overrides(argv: list[str]) -> list[str]:
    """What run.py adds to Hydra's command line: no logs, and no output folder unless the YAML
    (or the command line) sets hydra.run.dir."""
    if any(arg.startswith("hydra.run.dir=") for arg in argv):
        return list(HYDRA_LOGS_OFF)
    path, name = _option(argv, "--config-path", "-cp"), _option(argv, "--config-name", "-cn")
    if path and name and _sets_run_dir(Path(path) / f"{name.removesuffix('.yaml')}.yaml"):
        return list(HYDRA_LOGS_OFF)
    return list(HYDRA_QUIET)


def _option(argv: list[str], *names: str) -> str | None:
    for index, arg in enumerate(argv):
        for name in names:
            if arg == name and index + 1 < len(argv):
                return argv[index + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _sets_run_dir(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    hydra_section = data.get("hydra") if isinstance(data, dict) else None
    run = hydra_section.get("run") if isinstance(hydra_section, dict) else None
    return isinstance(run, dict) and run.get("dir") is not None


def compose_error(err: BaseException, config: Path | str) -> str:
    """One line for a YAML file or Hydra composition that cannot be loaded (the file and line when known)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"cannot load {mark.name}:{mark.line + 1}: {err.problem} ({err.context or 'YAML syntax'}); fix that line"
    key = getattr(err, "full_key", None)
    where = f" (key {key})" if key else ""
    return f"cannot compose {config}{where}: {str(err).splitlines()[0]}"


def run_hydra_main(main: Any, argv: list[str]) -> None:
    """Run a @hydra.main function; a config Hydra cannot compose ends in one line, exit status 2."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing a trace; the error is ours to show
    try:
        main()
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:
        path, name = _option(argv, "--config-path", "-cp") or ".", _option(argv, "--config-name", "-cn") or "?"
        print(f"error: {compose_error(err, Path(path) / (name.removesuffix('.yaml') + '.yaml'))}", file=sys.stderr)
        sys.exit(2)


def hydra_choices(choices: Any) -> tuple[tuple[str, str | None], ...]:
    """Hydra's chosen config group options, without Hydra's own groups."""
    return tuple((str(k), None if v is None else str(v)) for k, v in dict(choices).items()
                 if not str(k).startswith("hydra"))


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
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base=None):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(compose_error(err, config_dir / f"{config_name}.yaml")) from None
    choices = hydra_choices(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, ConfigSource(config_dir=config_dir, config_name=config_name, overrides=tuple(overrides),
                             choices=choices)
