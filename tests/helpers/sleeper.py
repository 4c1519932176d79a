"""A light stand-in for torchrun's program in launcher tests and the fan-out benchmark:
records its argv, pid and host, then sleeps (SLEEPER_SECONDS, default 300)."""

import json
import os
import socket
import sys
import time
from pathlib import Path

out = Path(os.environ.get("SLEEPER_DIR", "."))
out.mkdir(parents=True, exist_ok=True)
info = {"pid": os.getpid(), "pgid": os.getpgid(0), "argv": sys.argv[1:], "host": os.environ.get("SLEEPER_HOST"),
        "node": socket.gethostname(), "time": time.time()}
(out / f"{os.getpid()}.json").write_text(json.dumps(info))
print(f"sleeper {os.getpid()} started with {len(sys.argv) - 1} arguments", flush=True)
time.sleep(float(os.environ.get("SLEEPER_SECONDS", "300")))
