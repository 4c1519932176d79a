"""Serve runner: plans each deployment's OpenAI-compatible server through its engine (flagscale/serve/engines/:
vLLM, llama.cpp, SGLang, ...); this module never names an engine.

One host: each deployment is its engine's server on it. Several hosts (a hostfile): an engine that spans hosts on
Ray (vLLM) gets a Ray cluster (head on the first host, a worker on each other, all `ray start --block`) and its
server on the head, started once every node has joined; an engine that spans hosts by node rank (SGLang) runs its
server on every host with that host's rank; an engine that serves from one host is refused in one line. The job is
'started' once every server answers its ready URLs (Plan.ready); each listening port is checked free first
(Plan.ports_to_check).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from flagscale.config.hostfile import Host
from flagscale.exceptions import ConfigError
from flagscale.runner.base import PlanContext, TaskRunner
from flagscale.serve.deployment import Deployment, Resources, parse_deployments
from flagscale.serve.engines import engine_for
from flagscale.serve.engines.base import Endpoint, ServingEngine
from flagscale.serve.ray_cluster import DRYRUN_PORT, RayCluster
from flagscale.spec.plan import Plan, PortCheck, ProcessSpec, ReadyCheck, readable

DEFAULT_ENGINE = "vllm"


class ServeRunner(TaskRunner):
    task_type = "serve"

    def validate(self, ctx: PlanContext) -> None:
        runner = ctx.job.experiment.runner
        ctx.master_port = ctx.master_port or runner.ray_port
        deployments = self._deployments(ctx)
        if ctx.scheduled and len(ctx.hosts) > 1:
            raise ConfigError("serving on Slurm runs on one node: set experiment.runner.nnodes=1 (a multi-node "
                              "server needs its Ray cluster, which FlagScale starts over SSH from a hostfile)")
        ports: dict[int, str] = {}
        for index, deployment in enumerate(deployments):
            engine = engine_for(deployment.engine, f"deployment {deployment.serve_id}: engine")
            where = self._endpoint(ctx, engine, deployment)
            if where.port in ports:
                raise ConfigError(f"deployments {ports[where.port]} and {deployment.serve_id} both use port "
                                  f"{where.port}; set serve.{index}.engine_args.port to another one")
            ports[where.port] = deployment.serve_id
            self._check_engine(ctx, engine, deployment)
        if len(ctx.hosts) > 1:
            cluster_resources(deployments)

    def _check_engine(self, ctx: PlanContext, engine: ServingEngine, deployment: Deployment) -> None:
        """The engine can span the hosts, is installed (checked where the job's python is this one) and has its
        model; what it drops is noted. A dryrun notes what a run would refuse."""
        if len(ctx.hosts) > 1 and engine.multi_host_mode(deployment) is None:
            raise ConfigError(f"deployment {deployment.serve_id}: {engine.name} serves from one host; remove the "
                              "hostfile or set experiment.runner.nnodes=1")
        problems = [engine.model_problem(deployment) if ctx.hosts[0].is_local else None]
        if ctx.job.python == sys.executable:
            problems.append(engine.missing(ctx.job.python))
        for problem in filter(None, problems):
            if ctx.job.action != "dryrun":
                raise ConfigError(problem)
            ctx.notes.append(problem)
        dropped = engine.dropped(deployment)
        if dropped:
            ctx.notes.append(f"deployment {deployment.serve_id}: {engine.name} has no use for {', '.join(dropped)} "
                             "(settings of another engine); not passed")

    def plan(self, ctx: PlanContext) -> Plan:
        deployments = self._deployments(ctx)
        engines = [engine_for(d.engine) for d in deployments]
        cluster = self._cluster(ctx, deployments, engines)
        head = ctx.hosts[0]
        servers = [spec for d, e in zip(deployments, engines) for spec in self._servers(ctx, d, e, cluster)]
        nodes = [self._ray_node(ctx, cluster, h, rank) for rank, h in enumerate(cluster.hosts)] if cluster else []
        endpoints = [self._endpoint(ctx, e, d) for d, e in zip(deployments, engines)]
        urls = tuple(url for e in endpoints for url in e.ready_urls)
        notes = ctx.notes + [f"deployment {d.serve_id} ({e.name}) serves at {readable(w.base_url)}/v1"
                             for d, e, w in zip(deployments, engines, endpoints)]
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
        engines = [engine_for(d.engine) for d in deployments]
        return {
            "urls": {d.serve_id: self._endpoint(ctx, e, d).base_url + "/v1" for d, e in zip(deployments, engines)},
            "models": {d.serve_id: e.served_name(d) for d, e in zip(deployments, engines)},
            "engines": {d.serve_id: e.name for d, e in zip(deployments, engines)},
        }

    def _deployments(self, ctx: PlanContext) -> list[Deployment]:
        """The serve section; experiment.runner.deploy gives the port and engine of deployments that set none,
        experiment.task.backend the engine after that (default: vllm)."""
        runner = ctx.job.experiment.runner
        default = runner.deploy.engine or ctx.job.experiment.task.backend or DEFAULT_ENGINE
        engine_for(default, "experiment.task.backend / experiment.runner.deploy.engine")
        deployments = parse_deployments(ctx.job.task, "serve", default_engine=default)
        for deployment in deployments:
            if runner.deploy.port is not None and deployment.engine_args.get("port") is None:
                deployment.engine_args["port"] = runner.deploy.port
        return deployments

    def _endpoint(self, ctx: PlanContext, engine: ServingEngine, deployment: Deployment) -> Endpoint:
        return engine.endpoint(deployment, ctx.hosts[0], ctx.address(ctx.hosts[0]))

    def _cluster(self, ctx: PlanContext, deployments: list[Deployment],
                 engines: list[ServingEngine]) -> RayCluster | None:
        if len(ctx.hosts) == 1 or not any(e.multi_host_mode(d) == "ray" for d, e in zip(deployments, engines)):
            return None
        return RayCluster(hosts=tuple(ctx.hosts), port=ctx.master_port or DRYRUN_PORT,
                          resources=cluster_resources(deployments), python=ctx.job.python,
                          dashboard_port=ctx.job.experiment.runner.ray_dashboard_port)

    def _servers(self, ctx: PlanContext, deployment: Deployment, engine: ServingEngine,
                 cluster: RayCluster | None) -> list[ProcessSpec]:
        """The deployment's server: on the head (one host, or Ray), or on every host with its rank."""
        head = ctx.hosts[0]
        where = self._endpoint(ctx, engine, deployment)
        mode = engine.multi_host_mode(deployment) if len(ctx.hosts) > 1 else None
        argv = engine.argv(ctx.job.python, deployment, where, nodes=len(ctx.hosts),
                           entrypoint=ctx.job.experiment.task.entrypoint)
        env = {"PYTHONUNBUFFERED": "1", **engine.env(deployment, ctx.exp_dir / "cache")}
        if mode == "ranks":
            port = ctx.master_port or DRYRUN_PORT
            return [self._process(ctx, deployment, host, rank,
                                  argv + engine.rank_args(len(ctx.hosts), rank, ctx.address(head), port),
                                  {**env, **engine.rank_env(host)})
                    for rank, host in enumerate(ctx.hosts)]
        if mode == "ray" and cluster is not None:
            argv = cluster.wait_argv(argv)
            env.update(cluster.node_env(head))
        return [self._process(ctx, deployment, head, 0, argv, env)]

    def _process(self, ctx: PlanContext, deployment: Deployment, host: Host, rank: int, argv: list[str],
                 env: dict[str, str]) -> ProcessSpec:
        return ProcessSpec(host=host, node_rank=rank, argv=argv, env={**env, **ctx.host_env(host)}, cwd=os.getcwd(),
                           log_path=str(ctx.log_dir / f"{host.slug}-{deployment.serve_id}.log"),
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

