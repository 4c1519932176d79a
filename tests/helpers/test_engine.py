"""A serving engine that lives outside flagscale/: registered by a test, it plans and dry-runs through the serve
runner like the built-in ones (the registry is the only place that knows it)."""

from __future__ import annotations

from flagscale.serve.deployment import Deployment
from flagscale.serve.engines.base import Endpoint, ServingEngine, flags


class EchoServer(ServingEngine):
    name = "echo"
    default_port = 8765
    ready_paths = ("/ready",)

    def argv(self, python: str, deployment: Deployment, where: Endpoint, *, nodes: int = 1,
             entrypoint: str | None = None) -> list[str]:
        args = {"bind": where.bind_host, **self.arguments(deployment)}
        for name in ("model", "host", "port"):
            args.pop(name, None)
        return [python, "-m", "http.server", str(where.port), *flags(deployment, args)]

    def env(self, deployment: Deployment, cache_dir) -> dict[str, str]:
        return {"ECHO_CACHE": str(cache_dir / "echo")}
