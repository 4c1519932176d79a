"""The serving-engine interface: what the serve runner asks of every engine.

An engine turns a deployment (its `engine_args`, already merged with `engine_args_specific[engine]`) into the
command line of its OpenAI-compatible server, names the environment it needs, the URLs that say it is ready, the
name clients ask for, what a missing model looks like, and whether it can span hosts. Everything else — hosts,
ports checked free, env layering, scripts, logs, stop — is the runner's and the launcher's, the same for all.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from flagscale.config.flatten import flatten_leaves, to_argv
from flagscale.config.hostfile import Host
from flagscale.exceptions import ConfigError
from flagscale.serve.deployment import Deployment

LOOPBACK = "127.0.0.1"
WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """Where a deployment listens, and the address this machine reaches it at."""

    bind_host: str
    port: int
    connect_host: str
    ready_paths: tuple[str, ...] = ("/health", "/v1/models")

    @property
    def base_url(self) -> str:
        host = f"[{self.connect_host}]" if ":" in self.connect_host else self.connect_host
        return f"http://{host}:{self.port}"

    @property
    def ready_urls(self) -> tuple[str, ...]:
        """The server is up once all of them answer 200."""
        return tuple(f"{self.base_url}{path}" for path in self.ready_paths)


class ServingEngine(ABC):
    """One serving engine. Subclasses differ only in the facts below and in `argv`."""

    name: ClassVar[str]
    default_port: ClassVar[int] = 8000
    multi_host: ClassVar[str | None] = None
    """How one deployment spans several hosts: "ray" (the server on the first host, on a Ray cluster FlagScale
    starts), "ranks" (the server on every host, each with its node rank: `rank_args`), or None: one host."""
    ready_paths: ClassVar[tuple[str, ...]] = ("/health", "/v1/models")
    python_module: ClassVar[str | None] = None
    """The Python package the server needs on the host (checked here before a launch from this machine)."""
    install_hint: ClassVar[str] = ""
    memory_knobs: ClassVar[frozenset[str]] = frozenset({"max_num_seqs", "max_model_len", "max_num_batched_tokens"})
    """engine_args whose larger values need more memory (the auto-tuner prunes past a trial that ran out)."""
    split_knobs: ClassVar[frozenset[str]] = frozenset()
    """engine_args whose larger values split the model over more devices (less memory on each)."""

    @abstractmethod
    def argv(self, python: str, deployment: Deployment, where: Endpoint, *, nodes: int = 1,
             entrypoint: str | None = None) -> list[str]:
        """The server's command line, listening where `where` says, for a deployment across `nodes` hosts."""

    def multi_host_mode(self, deployment: Deployment) -> str | None:
        """How this deployment spans hosts (default: the engine's `multi_host`)."""
        return self.multi_host

    def rank_env(self, host: Host) -> dict[str, str]:
        """A "ranks" engine: environment of the server on `host` (e.g. the address it advertises)."""
        return {}

    def rank_args(self, nnodes: int, node_rank: int, master: str, port: int) -> list[str]:
        """A "ranks" engine: what the server on node `node_rank` of `nnodes` adds to its command line."""
        raise NotImplementedError(f"{self.name} does not span hosts by node rank")

    def dropped(self, deployment: Deployment) -> list[str]:
        """engine_args this engine does not use (shown as a note), e.g. another engine's performance knobs."""
        return []

    def arguments(self, deployment: Deployment) -> dict[str, Any]:
        """The deployment's engine_args by this engine's own names (default: as given)."""
        return dict(deployment.engine_args)

    def env(self, deployment: Deployment, cache_dir: Path) -> dict[str, str]:
        """Environment the server needs beyond the job's (caches under the experiment dir)."""
        return {}

    def served_name(self, deployment: Deployment) -> str:
        """The model name clients send."""
        args = deployment.engine_args
        name = args.get("served_model_name") or args["model"]
        return str(name[0] if isinstance(name, list) else name)

    def model_problem(self, deployment: Deployment) -> str | None:
        """What is wrong with a local model path (None: fine, or not a local path)."""
        model = str(deployment.engine_args["model"])
        path = Path(model).expanduser()
        local = model.startswith(("/", "./", "../", "~")) or len(path.parts) > 2
        if not local or path.exists():
            return None
        return f"deployment {deployment.serve_id}: engine_args.model {model} does not exist; {self.model_hint(model)}"

    def model_hint(self, model: str) -> str:
        return "point engine_args.model at the model to serve"

    def missing(self, python: str) -> str | None:
        """Why this engine cannot start here (not installed), or None. Checked for the interpreter running
        FlagScale when it is the job's."""
        if self.python_module and importlib.util.find_spec(self.python_module) is None:
            return f"{self.name} is not installed here (no Python package '{self.python_module}'); {self.install_hint}"
        return None

    def devices(self, deployment: Deployment) -> int:
        """Devices (GPUs, or CPU processes) one server of this deployment uses."""
        return 1

    def context_per_request(self, deployment: Deployment) -> int | None:
        """Tokens one request may hold (prompt and output): engine_args.max_model_len, else the model's own."""
        given = deployment.engine_args.get("max_model_len")
        if given is not None:
            return int(given)
        config = hf_config(str(deployment.engine_args["model"]))
        value = (config or {}).get("max_position_embeddings")
        return int(value) if value else None

    def vocab_size(self, deployment: Deployment) -> int | None:
        """The model's vocabulary size, read from its files (None: not a local model, or not said there)."""
        value = (hf_config(str(deployment.engine_args["model"])) or {}).get("vocab_size")
        return int(value) if value else None

    def fit_problems(self, deployment: Deployment, longest_request: int, devices: int) -> list[str]:
        """Why these settings cannot serve requests of up to `longest_request` tokens on `devices` devices (the
        auto-tuner's static pruning; empty: they can)."""
        problems = []
        if self.devices(deployment) > devices:
            problems.append(f"needs {self.devices(deployment)} devices, {devices} available")
        context = self.context_per_request(deployment)
        if context is not None and context < longest_request:
            problems.append(f"holds {context} tokens per request, the load's longest request needs {longest_request}")
        return problems

    def endpoint(self, deployment: Deployment, host: Host, address: str | None = None) -> Endpoint:
        """engine_args.host (default: 127.0.0.1 on this machine, else the host's own address: `address`, or its
        name) and port (default: the engine's)."""
        args = deployment.engine_args
        port = args.get("port", self.default_port)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ConfigError(f"deployment {deployment.serve_id}: engine_args.port must be a port number, got "
                              f"{port!r}")
        own = LOOPBACK if host.is_local else address or host.name
        bind = args.get("host")
        bind = own if bind is None else str(bind)
        return Endpoint(bind_host=bind, port=port, connect_host=own if bind in WILDCARDS else bind,
                        ready_paths=self.ready_paths)


def flags(deployment: Deployment, args: dict[str, Any]) -> list[str]:
    """Arguments as command-line flags under the shared flattening rules (flagscale/config/flatten.py)."""
    return to_argv(flatten_leaves(args, f"{deployment.serve_id}.engine_args"))


def hf_config(model: str) -> dict[str, Any] | None:
    """config.json of a local Hugging Face model folder (None: no such folder)."""
    path = Path(model).expanduser() / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_ip(name: str) -> bool:
    """True for an IPv4/IPv6 literal (Ray and vLLM take those as node addresses)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
