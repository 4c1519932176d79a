"""`python tools/patch/unpatch.py --backend NAME`: see tools/patch/cli.py and docs/patching.md."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable so that `tools.patch` resolves.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.patch.cli import main_unpatch

if __name__ == "__main__":
    sys.exit(main_unpatch())
