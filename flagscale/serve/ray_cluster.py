"""Planning a Ray cluster for a multi-host job: the head on the first host, a worker on each other.

Every node is `ray start --block`, so the Ray processes stay in the job's recorded process tree
and `stop` ends them like any other process (never `ray stop`, which kills every Ray process on
a machine by name). Every node names its own address (`--node-ip-address`, and VLLM_HOST_IP for
the engine's workers): left to itself Ray guesses one from the default route, which may be another
interface or none. The head's ports are the config's where it gives them (master_port/ray_port,
ray_dashboard_port; no dashboard otherwise). Workers wait for the head's port before they join; the
engine process on the head waits for all nodes before it starts (flagscale/serve/ray_node.py does both).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from functools import lru_cache

from flagscale.config.hostfile import Host
from flagscale.serve.deployment import Resources
from flagscale.serve.engines.base import is_ip

RAY_CLI = ("-m", "ray.scripts.scripts")
NODE_PROGRAM = ("-m", "flagscale.serve.ray_node")
DRYRUN_PORT = 6379
JOIN_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RayCluster:
    """The nodes of one job's Ray cluster and how they find each other."""

    hosts: tuple[Host, ...]
    port: int
    """The head's GCS port (experiment.runner.master_port, or one found free at launch)."""
    resources: Resources
    python: str
    dashboard_port: int | None = None
    """experiment.runner.ray_dashboard_port: the head serves Ray's dashboard there (default: none)."""

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def address(self) -> str:
        return f"{self.head.name}:{self.port}"

    def node_argv(self, host: Host) -> list[str]:
        """`ray start --block` for one node: --head on the first host, --address on the others."""
        start = [self.python, *RAY_CLI, "start", "--block", "--disable-usage-stats"]
        if host == self.head:
            start += ["--head", "--port", str(self.port)]
            dashboard = ["--include-dashboard", "true", "--dashboard-port", str(self.dashboard_port)]
            start += dashboard if self.dashboard_port else ["--include-dashboard", "false"]
        else:
            start += ["--address", self.address]
        start += ["--node-ip-address", node_address(host.name)]
        start += self._resource_args(host)
        if host == self.head:
            return start
        return [self.python, *NODE_PROGRAM, "join", "--address", self.address,
                "--timeout", str(JOIN_TIMEOUT_S), "--", *start]

    def wait_argv(self, command: list[str]) -> list[str]:
        """`command`, started once every node has joined, with RAY_ADDRESS pointing at the head."""
        return [self.python, *NODE_PROGRAM, "wait", "--address", self.address, "--nodes", str(len(self.hosts)),
                "--timeout", str(JOIN_TIMEOUT_S), "--", *command]

    def node_env(self, host: Host) -> dict[str, str]:
        """What each node's processes (and so the engine's Ray workers) inherit."""
        env = {"PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        address = node_address(host.name)
        if is_ip(address):
            env["VLLM_HOST_IP"] = address
        return env

    def _resource_args(self, host: Host) -> list[str]:
        res = self.resources
        num_gpus = res.num_gpus if res.num_gpus is not None else (host.slots if host.type else None)
        args: list[str] = []
        for flag, value in (("--num-cpus", res.num_cpus), ("--num-gpus", num_gpus),
                            ("--object-store-memory", res.object_store_memory)):
            if value is not None:
                args += [flag, str(value)]
        if res.custom:
            args += ["--resources", json.dumps(res.custom, sort_keys=True)]
        return args


@lru_cache(maxsize=256)
def node_address(name: str) -> str:
    """A node's address as the hostfile names it: an IP as it is, a name resolved on this machine (the one
    that reaches the hosts) to its IPv4 address, or the name itself if it does not resolve here (as in a
    dryrun of an example's node1)."""
    if is_ip(name):
        return name
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return name
    return str(infos[0][4][0]) if infos else name
