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

import dataclasses
import os
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Instance:
    """One server of a deployment: the deployment itself, or one of its `resources.num_replicas` copies (its own
    serve_id `NAME-i` and port), on the hosts it spans (all of the job's, or one for a replica)."""

    deployment: Deployment
    engine: ServingEngine
    hosts: tuple[Host, ...]
    index: int
    """The deployment's position in the serve list (for the fix in error messages)."""

    @property
    def head(self) -> Host:
        return self.hosts[0]


class ServeRunner(TaskRunner):
    task_type = "serve"

    def validate(self, ctx: PlanContext) -> None:
        runner = ctx.job.experiment.runner
        ctx.master_port = ctx.master_port or runner.ray_port
        if ctx.scheduled and len(ctx.hosts) > 1:
            raise ConfigError("serving on Slurm runs on one node: set experiment.runner.nnodes=1 (a multi-node "
                              "server needs its Ray cluster, which FlagScale starts over SSH from a hostfile)")
        ports: dict[tuple[str, int], str] = {}
        for instance in self._instances(ctx):
            deployment = instance.deployment
            where = self._endpoint(ctx, instance)
            for host in instance.hosts:
                if (host.name, where.port) in ports:
                    raise ConfigError(f"deployments {ports[(host.name, where.port)]} and {deployment.serve_id} both "
                                      f"use port {where.port} on {host.name}; set serve.{instance.index}.engine_args."
                                      "port to another one")
                ports[(host.name, where.port)] = deployment.serve_id
            self._check_engine(ctx, instance)
        if len(ctx.hosts) > 1:
            cluster_resources([i.deployment for i in self._instances(ctx) if len(i.hosts) > 1])

    def _check_engine(self, ctx: PlanContext, instance: Instance) -> None:
        """The engine can span the instance's hosts, is installed (checked where the job's python is this one) and
        has its model; what it drops is noted. A dryrun notes what a run would refuse."""
        engine, deployment = instance.engine, instance.deployment
        if len(instance.hosts) > 1 and engine.multi_host_mode(deployment) is None:
            raise ConfigError(f"deployment {deployment.serve_id}: {engine.name} serves from one host; remove the "
                              "hostfile, set experiment.runner.nnodes=1, or run one replica per host "
                              "(resources.num_replicas)")
        problems = [engine.model_problem(deployment) if instance.head.is_local else None]
        if ctx.job.python == sys.executable:
            problems.append(engine.missing(ctx.job.python))
        for problem in filter(None, problems):
            if ctx.job.action != "dryrun":
                raise ConfigError(problem)
            if problem not in ctx.notes:
                ctx.notes.append(problem)
        dropped = engine.dropped(deployment)
        note = (f"deployment {deployment.serve_id}: {engine.name} has no use for {', '.join(dropped)} (settings of "
                "another engine); not passed")
        if dropped and note not in ctx.notes:
            ctx.notes.append(note)

    def plan(self, ctx: PlanContext) -> Plan:
        instances = self._instances(ctx)
        cluster = self._cluster(ctx, instances)
        servers = [spec for instance in instances for spec in self._servers(ctx, instance, cluster)]
        nodes = [self._ray_node(ctx, cluster, h, rank) for rank, h in enumerate(cluster.hosts)] if cluster else []
        endpoints = [self._endpoint(ctx, i) for i in instances]
        urls = tuple(url for e in endpoints for url in e.ready_urls)
        notes = ctx.notes + [f"deployment {i.deployment.serve_id} ({i.engine.name}) serves at {readable(w.base_url)}/v1"
                             for i, w in zip(instances, endpoints)]
        return Plan(
            task_type="serve", exp_dir=str(ctx.exp_dir), run_id=ctx.run_id, log_dir=str(ctx.log_dir),
            processes=servers + nodes, after_stop=ctx.job.experiment.cmds.lines("after_stop"),
            master_addr=ctx.hosts[0].name, master_port=ctx.master_port if cluster else endpoints[0].port,
            info=self.info(ctx), notes=notes,
            ready=ReadyCheck(urls=urls, timeout_s=max(i.deployment.ready_timeout_s for i in instances)),
            ports_to_check=[_port_check(i.head, e, i.index) for i, e in zip(instances, endpoints)],
        )

    def info(self, ctx: PlanContext) -> dict[str, Any]:
        instances = self._instances(ctx)
        return {
            "urls": {i.deployment.serve_id: self._endpoint(ctx, i).base_url + "/v1" for i in instances},
            "models": {i.deployment.serve_id: i.engine.served_name(i.deployment) for i in instances},
            "engines": {i.deployment.serve_id: i.engine.name for i in instances},
        }

    def _instances(self, ctx: PlanContext) -> list[Instance]:
        """Every server the serve section asks for. experiment.runner.deploy gives the port and engine of
        deployments that set none, experiment.task.backend the engine after that (default: vllm). A deployment
        with resources.num_replicas N becomes N servers, one host each, round the hosts, on its port and the ones
        after it where a host runs several."""
        runner = ctx.job.experiment.runner
        default = runner.deploy.engine or ctx.job.experiment.task.backend or DEFAULT_ENGINE
        engine_for(default, "experiment.task.backend / experiment.runner.deploy.engine")
        instances = []
        for index, deployment in enumerate(parse_deployments(ctx.job.task, "serve", default_engine=default)):
            if runner.deploy.port is not None and deployment.engine_args.get("port") is None:
                deployment.engine_args["port"] = runner.deploy.port
            engine = engine_for(deployment.engine, f"deployment {deployment.serve_id}: engine")
            replicas = deployment.resources.num_replicas
            if replicas == 1:
                instances.append(Instance(deployment, engine, tuple(ctx.hosts), index))
                continue
            port = engine.endpoint(deployment, ctx.hosts[0]).port
            for i in range(replicas):
                copy = dataclasses.replace(deployment, serve_id=f"{deployment.serve_id}-{i}",
                                           engine_args={**deployment.engine_args, "port": port + i // len(ctx.hosts)})
                instances.append(Instance(copy, engine, (ctx.hosts[i % len(ctx.hosts)],), index))
        return instances

    def _endpoint(self, ctx: PlanContext, instance: Instance) -> Endpoint:
        return instance.engine.endpoint(instance.deployment, instance.head, ctx.address(instance.head))

    def _cluster(self, ctx: PlanContext, instances: list[Instance]) -> RayCluster | None:
        spanning = [i for i in instances if len(i.hosts) > 1 and i.engine.multi_host_mode(i.deployment) == "ray"]
        if not spanning:
            return None
        return RayCluster(hosts=tuple(ctx.hosts), port=ctx.master_port or DRYRUN_PORT,
                          resources=cluster_resources([i.deployment for i in spanning]), python=ctx.job.python,
                          dashboard_port=ctx.job.experiment.runner.ray_dashboard_port)

    def _servers(self, ctx: PlanContext, instance: Instance, cluster: RayCluster | None) -> list[ProcessSpec]:
        """The instance's server: on its host (one host, or the Ray head), or on every host with its rank."""
        engine, deployment, head = instance.engine, instance.deployment, instance.head
        nodes = len(instance.hosts)
        mode = engine.multi_host_mode(deployment) if nodes > 1 else None
        argv = engine.argv(ctx.job.python, deployment, self._endpoint(ctx, instance), nodes=nodes,
                           entrypoint=ctx.job.experiment.task.entrypoint)
        env = {"PYTHONUNBUFFERED": "1", **engine.env(deployment, ctx.exp_dir / "cache")}
        if mode == "ranks":
            port = ctx.master_port or DRYRUN_PORT
            return [self._process(ctx, deployment, host, rank,
                                  argv + engine.rank_args(nodes, rank, ctx.address(head), port),
                                  {**env, **engine.rank_env(host)})
                    for rank, host in enumerate(instance.hosts)]
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

