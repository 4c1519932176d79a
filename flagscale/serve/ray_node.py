"""Host-side Ray bootstrap steps of a multi-host job (run by the job's scripts, not by the launcher).

    python -m flagscale.serve.ray_node join --address HEAD:PORT [--timeout S] -- ray start --address ... --block
        wait until the head answers on its port, then become the `ray start` command
    python -m flagscale.serve.ray_node wait --address HEAD:PORT --nodes N [--timeout S] -- COMMAND ...
        wait until N Ray nodes are alive, then become COMMAND with RAY_ADDRESS=HEAD:PORT

Both replace themselves with the command (exec), so the recorded process tree is the command's.
A time-out is one line on stderr naming what did not come, and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"error: --address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _answers(address: str) -> bool:
    host, port = _split_address(address)
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _poll(done: Callable[[], bool], timeout: float, what: str) -> None:
    """Return once `done()` is true; exit 1 naming `what` after `timeout` seconds."""
    start, shown = time.monotonic(), 0.0
    while not done():
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            print(f"error: {what} after {timeout:.0f}s; see the Ray logs of the other hosts", file=sys.stderr)
            raise SystemExit(1)
        if elapsed - shown >= 10:
            print(f"still waiting: {what} ({elapsed:.0f}s)", flush=True)
            shown = elapsed
        time.sleep(1.0)


def _alive_nodes(address: str) -> int:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def wait_nodes(address: str, nodes: int, timeout: float) -> None:
    """Return once the cluster at `address` has `nodes` live nodes."""
    _poll(lambda: _answers(address), timeout, f"the Ray head {address} does not answer")
    _poll(lambda: _alive_nodes(address) >= nodes, timeout, f"fewer than {nodes} Ray nodes joined {address}")
    print(f"Ray cluster {address}: {nodes} node(s) alive", flush=True)
    import ray

    ray.shutdown()


def _exec(command: list[str], env: dict[str, str]) -> None:
    if not command:
        raise SystemExit("error: give the command to run after '--'")
    sys.stdout.flush()
    os.execvpe(command[0], command, env)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv and not {"-h", "--help"} & set(argv):
        raise SystemExit("error: give the command to run after '--' (see python -m flagscale.serve.ray_node -h)")
    split = argv.index("--") if "--" in argv else len(argv)
    own, command = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="python -m flagscale.serve.ray_node", description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("join", "wait"))
    parser.add_argument("--address", required=True, help="The Ray head's HOST:PORT.")
    parser.add_argument("--nodes", type=int, default=1, help="wait: how many nodes must be alive.")
    parser.add_argument("--timeout", type=float, default=300.0, help="Seconds to wait before giving up.")
    args = parser.parse_args(own)
    if args.step == "join":
        _poll(lambda: _answers(args.address), args.timeout, f"the Ray head {args.address} does not answer")
        _exec(command, dict(os.environ))
    wait_nodes(args.address, args.nodes, args.timeout)
    _exec(command, {**os.environ, "RAY_ADDRESS": args.address})


if __name__ == "__main__":
    main()
