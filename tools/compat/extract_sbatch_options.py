"""Write flagscale/config/data/sbatch_options.json from the `sbatch --help` of the Slurm installed here.

    python tools/compat/extract_sbatch_options.py            # needs sbatch (Debian's slurm-wlm)

sbatch reads a configuration even for --help; without one (no SLURM_CONF, no /etc/slurm/slurm.conf) a minimal
one is written to a temporary folder for the call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from flagscale.config.sbatch import DATA, parse_help


def sbatch_help() -> tuple[str, str]:
    """(sbatch --help text, sbatch --version)."""
    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ)
        if "SLURM_CONF" not in env and not Path("/etc/slurm/slurm.conf").is_file():
            conf = Path(scratch) / "slurm.conf"
            conf.write_text("ClusterName=help\nSlurmctldHost=localhost\n")
            env["SLURM_CONF"] = str(conf)
        text = subprocess.run(["sbatch", "--help"], capture_output=True, text=True, env=env, check=True).stdout
        version = subprocess.run(["sbatch", "--version"], capture_output=True, text=True, env=env).stdout.strip()
    return text, version


def main() -> None:
    text, version = sbatch_help()
    table = {"source": f"sbatch --help of {version}", **parse_help(text)}
    DATA.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {DATA}: {len(table['long'])} long options, {len(table['short'])} short ones ({version})")


if __name__ == "__main__":
    main()
