"""Serve runner: plans vLLM's OpenAI-compatible server for each deployment of the serve YAML.

One host: each deployment is one `python -m vllm.entrypoints.openai.api_server` on it.
Several hosts (a hostfile): a Ray cluster (head on the first host, a worker on each other, all
`ray start --block`), and each deployment's server on the head, started once every node has joined,
with vLLM's distributed executor on Ray. The job is 'started' once every server answers
/health and /v1/models (Plan.ready); each listening port is checked free first (Plan.ports_to_check).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flagscale.config.hostfile import Host
from flagscale.exceptions import ConfigError
from flagscale.runner.base import PlanContext, TaskRunner
from flagscale.serve.deployment import Deployment, Resources, parse_deployments
from flagscale.serve.engine import Endpoint, endpoint, server_argv
from flagscale.serve.ray_cluster import DRYRUN_PORT, RayCluster
from flagscale.spec.plan import Plan, PortCheck, ProcessSpec, ReadyCheck, readable


class ServeRunner(TaskRunner):
    task_type = "serve"

    def validate(self, ctx: PlanContext) -> None:
        runner = ctx.job.experiment.runner
        ctx.master_port = ctx.master_port or runner.ray_port
        deployments = self._deployments(ctx)
        ports: dict[int, str] = {}
        if ctx.scheduled and len(ctx.hosts) > 1:
            raise ConfigError("serving on Slurm runs on one node: set experiment.runner.nnodes=1 (a multi-node "
                              "server needs its Ray cluster, which FlagScale starts over SSH from a hostfile)")
        for index, deployment in enumerate(deployments):
            where = endpoint(deployment, ctx.hosts[0], ctx.address(ctx.hosts[0]))
            if where.port in ports:
                raise ConfigError(f"deployments {ports[where.port]} and {deployment.serve_id} both use port "
                                  f"{where.port}; set serve.{index}.engine_args.port to another one")
            ports[where.port] = deployment.serve_id
            problem = _missing_model(deployment) if ctx.hosts[0].is_local else None
            if problem and ctx.job.action != "dryrun":
                raise ConfigError(problem)
            if problem:
                ctx.notes.append(problem)
        if len(ctx.hosts) > 1:
            cluster_resources(deployments)

    def plan(self, ctx: PlanContext) -> Plan:
        deployments = self._deployments(ctx)
        cluster = self._cluster(ctx, deployments)
        head = ctx.hosts[0]
        servers = [self._server(ctx, d, head, cluster) for d in deployments]
        nodes = [self._ray_node(ctx, cluster, h, rank) for rank, h in enumerate(cluster.hosts)] if cluster else []
        endpoints = [endpoint(d, head, ctx.address(head)) for d in deployments]
        urls = tuple(url for e in endpoints for url in e.ready_urls)
        notes = ctx.notes + [f"deployment {d.serve_id} serves at {readable(e.base_url)}/v1"
                             for d, e in zip(deployments, endpoints)]
        return Plan(
            task_type="serve", exp_dir=str(ctx.exp_dir), run_id=ctx.run_id, log_dir=str(ctx.log_dir),
            processes=servers + nodes, after_stop=ctx.job.experiment.cmds.lines("after_stop"),
            master_addr=head.name, master_port=ctx.master_port if cluster else endpoints[0].port,
            info=self.info(ctx), notes=notes,
            ready=ReadyCheck(urls=urls, timeout_s=max(d.ready_timeout_s for d in deployments)),
            ports_to_check=[_port_check(head, e, i) for i, e in enumerate(endpoints)],
        )

    def info(self, ctx: PlanContext) -> dict[str, Any]:
        deployments = self._deployments(ctx)
        return {
            "urls": {d.serve_id: endpoint(d, ctx.hosts[0], ctx.address(ctx.hosts[0])).base_url + "/v1"
                     for d in deployments},
            "models": {d.serve_id: _served_name(d) for d in deployments},
        }

    def _deployments(self, ctx: PlanContext) -> list[Deployment]:
        """The serve section; experiment.runner.deploy.port is the port of deployments that set none."""
        deployments = parse_deployments(ctx.job.task, "serve")
        port = ctx.job.experiment.runner.deploy.port
        for deployment in deployments:
            if port is not None and deployment.engine_args.get("port") is None:
                deployment.engine_args["port"] = port
        return deployments

    def _cluster(self, ctx: PlanContext, deployments: list[Deployment]) -> RayCluster | None:
        if len(ctx.hosts) == 1:
            return None
        return RayCluster(hosts=tuple(ctx.hosts), port=ctx.master_port or DRYRUN_PORT,
                          resources=cluster_resources(deployments), python=ctx.job.python,
                          dashboard_port=ctx.job.experiment.runner.ray_dashboard_port)

    def _server(self, ctx: PlanContext, deployment: Deployment, head: Host, cluster: RayCluster | None) -> ProcessSpec:
        argv = server_argv(ctx.job.python, deployment, head, ray=cluster is not None,
                           entrypoint=ctx.job.experiment.task.entrypoint, address=ctx.address(head))
        env = {"PYTHONUNBUFFERED": "1", "VLLM_CACHE_ROOT": str(ctx.exp_dir / "cache" / "vllm")}
        if cluster is not None:
            argv = cluster.wait_argv(argv)
            env.update(cluster.node_env(head))
        env.update(ctx.host_env(head))
        return ProcessSpec(host=head, node_rank=0, argv=argv, env=env, cwd=os.getcwd(),
                           log_path=str(ctx.log_dir / f"{head.slug}-{deployment.serve_id}.log"),
                           before_start=ctx.job.experiment.cmds.lines("before_start"), label=deployment.serve_id,
                           container=ctx.job.experiment.runner.docker)

    def _ray_node(self, ctx: PlanContext, cluster: RayCluster, host: Host, rank: int) -> ProcessSpec:
        env = {**cluster.node_env(host), **ctx.host_env(host)}
        return ProcessSpec(host=host, node_rank=rank, argv=cluster.node_argv(host), env=env, cwd=os.getcwd(),
                           log_path=str(ctx.log_dir / f"{host.slug}-ray.log"),
                           before_start=ctx.job.experiment.cmds.lines("before_start"), label="ray",
                           container=ctx.job.experiment.runner.docker)


def cluster_resources(deployments: list[Deployment]) -> Resources:
    """The Ray nodes' resources: the deployments that set them must agree (one cluster per job)."""
    chosen = [d for d in deployments if d.resources != Resources()]
    if any(d.resources != chosen[0].resources for d in chosen[1:]):
        names = ", ".join(d.serve_id for d in chosen)
        raise ConfigError(f"deployments {names} set different resources, but a job has one Ray cluster; "
                          "set resources on one deployment (or the same on each)")
    return chosen[0].resources if chosen else Resources()


def _port_check(host: Host, where: Endpoint, index: int) -> PortCheck:
    return PortCheck(host=host, port=where.port,
                     fix=f"Stop what listens there, or choose another port: serve.{index}.engine_args.port=N "
                         "(flagscale serve: --port N).")


def _served_name(deployment: Deployment) -> str:
    name = deployment.engine_args.get("served_model_name") or deployment.engine_args["model"]
    return str(name[0] if isinstance(name, list) else name)


def _missing_model(deployment: Deployment) -> str | None:
    """A model given as a local path that does not exist (hub ids like org/name are left to vLLM)."""
    model = str(deployment.engine_args["model"])
    path = Path(model).expanduser()
    local = model.startswith(("/", "./", "../", "~")) or len(path.parts) > 2
    if not local or path.exists():
        return None
    return (f"deployment {deployment.serve_id}: engine_args.model {model} does not exist; point engine_args.model "
            "(flagscale serve: --model-path) at a Hugging Face model folder, e.g. one converted from a training "
            f"checkpoint by: python tools/checkpoint/convert_megatron_to_hf.py --load CKPT_DIR --output {model}")
