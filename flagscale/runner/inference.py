"""Inference runner: plans the offline inference program (vLLM's `LLM` over a batch of prompts).

`python -m flagscale.inference.run_inference --config-json ...` on one host, writing JSONL under the
experiment dir; the job completes when the program does. A model that needs several hosts is
served instead (task type serve: a Ray cluster, and the batch sent to its OpenAI API).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from flagscale.config.schema import build
from flagscale.exceptions import ConfigError
from flagscale.inference.run_inference import InferenceConfig
from flagscale.runner.base import PlanContext, TaskRunner
from flagscale.runner.plan import Plan, ProcessSpec

PROGRAM = "flagscale.inference.run_inference"


class InferenceRunner(TaskRunner):
    task_type = "inference"

    def validate(self, ctx: PlanContext) -> None:
        config = self._config(ctx)
        if len(ctx.hosts) > 1:
            raise ConfigError(f"offline inference runs on one host, but {len(ctx.hosts)} are selected; set "
                              "experiment.runner.nnodes=1, or serve the model across hosts (task type serve)")
        if not config.llm.get("model"):
            raise ConfigError("inference.llm.model is required (a Hugging Face model folder, e.g. one written by "
                              "tools/checkpoint/convert_megatron_to_hf.py)")
        if not config.prompts and not config.prompts_file:
            raise ConfigError("inference needs prompts: set inference.prompts (a list) or inference.prompts_file")
        if config.prompts_file and not Path(config.prompts_file).is_file() and ctx.hosts[0].is_local:
            raise ConfigError(f"inference.prompts_file {config.prompts_file} does not exist "
                              f"(in {ctx.job.source.locate('inference.prompts_file')})")

    def plan(self, ctx: PlanContext) -> Plan:
        config = self._config(ctx)
        host = ctx.hosts[0]
        config.output_path = self.info(ctx)["output_path"]
        argv = [ctx.job.python, "-m", PROGRAM, "--config-json", json.dumps(dataclasses.asdict(config))]
        env = {"PYTHONUNBUFFERED": "1", "VLLM_CACHE_ROOT": str(ctx.exp_dir / "cache" / "vllm"),
               **ctx.host_env(host)}
        spec = ProcessSpec(host=host, node_rank=0, argv=argv, env=env, cwd=os.getcwd(),
                           log_path=str(ctx.log_dir / f"{host.slug}.log"),
                           before_start=ctx.job.experiment.cmds.lines("before_start"))
        return Plan(task_type="inference", exp_dir=str(ctx.exp_dir), run_id=ctx.run_id, log_dir=str(ctx.log_dir),
                    processes=[spec], after_stop=ctx.job.experiment.cmds.lines("after_stop"),
                    master_addr=host.name, master_port=ctx.master_port, info=self.info(ctx),
                    notes=ctx.notes + [f"results go to {config.output_path}"])

    def info(self, ctx: PlanContext) -> dict[str, Any]:
        output = self._config(ctx).output_path or str(ctx.exp_dir / "outputs" / f"{ctx.run_id}.jsonl")
        return {"output_path": str(Path(output).expanduser().resolve())}

    def _config(self, ctx: PlanContext) -> InferenceConfig:
        task = ctx.job.task
        if not isinstance(task, dict):
            raise ConfigError("the 'inference' section must be a mapping (llm, sampling, prompts, prompts_file)")
        return build(InferenceConfig, task, "inference")
