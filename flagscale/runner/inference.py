"""Inference runner: plans the offline inference program (vLLM's `LLM` over a batch of prompts).

`python -m flagscale.inference.run_inference --config-json ...` on one host, writing JSONL under the
experiment dir; the job completes when the program does. A model that needs several hosts is
served instead (task type serve: a Ray cluster, and the batch sent to its OpenAI API).

The `inference` section has upstream FlagScale's shape (`llm`, `generate.prompts`, `generate.sampling`);
see flagscale/inference/run_inference.py. The names under `llm` and `generate.sampling` are checked
against the vLLM installed here when the job runs on this machine, else by the program on its host.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from flagscale.exceptions import ConfigError
from flagscale.inference.run_inference import PROMPT_SOURCES, InferenceConfig, VllmNames, parse_config
from flagscale.runner.base import PlanContext, TaskRunner
from flagscale.spec.plan import Plan, ProcessSpec

PROGRAM = "flagscale.inference.run_inference"
T = TypeVar("T")

UPSTREAM_PROGRAMS: dict[str, str | None] = {
    "inference_aquila.py": None,
    "inference_emu3.py": "Emu3 image generation and understanding",
    "inference_emu3p5.py": "Emu3.5 image generation",
    "inference_robobrain2.py": "RoboBrain2 image and video understanding",
    "diffusion_entrypoint.py": "diffusion pipelines",
    "embodied_entrypoint.py": "embodied (pi0) policies",
}
"""Upstream FlagScale's inference programs by file name: None where the built-in program does the same
(vLLM's LLM.generate over text prompts), else what the program is for, which this project does not run."""


@dataclass(frozen=True, slots=True)
class Program:
    """The command before `--config-json`, and a note when an upstream entrypoint was replaced."""

    argv: list[str]
    note: str | None = None


class InferenceRunner(TaskRunner):
    task_type = "inference"

    def validate(self, ctx: PlanContext) -> None:
        config = self._config(ctx)
        if len(ctx.hosts) > 1:
            raise ConfigError(f"offline inference runs on one host, but {len(ctx.hosts)} are selected; set "
                              "experiment.runner.nnodes=1, or serve the model across hosts (task type serve)")
        if not config.llm.get("model"):
            raise ConfigError(self._located(ctx, "inference.llm.model is required (a Hugging Face model folder, e.g. "
                                                 "one written by tools/checkpoint/convert_megatron_to_hf.py)"))
        self._check_prompts(ctx, config)
        self._check_model(ctx, str(config.llm["model"]))
        names = VllmNames.from_source() if ctx.hosts[0].is_local else None
        if names is not None:
            self._checked(ctx, lambda: names.check(config))
        note = self._program(ctx).note
        if note:
            ctx.notes.append(note)

    def plan(self, ctx: PlanContext) -> Plan:
        config = self._config(ctx)
        host = ctx.hosts[0]
        config.output_path = self.info(ctx)["output_path"]
        argv = [*self._program(ctx).argv, "--config-json", config.to_json()]
        env = {"PYTHONUNBUFFERED": "1", "VLLM_CACHE_ROOT": str(ctx.exp_dir / "cache" / "vllm"),
               **ctx.host_env(host)}
        spec = ProcessSpec(host=host, node_rank=0, argv=argv, env=env, cwd=os.getcwd(),
                           log_path=str(ctx.log_dir / f"{host.slug}.log"),
                           before_start=ctx.job.experiment.cmds.lines("before_start"),
                           container=ctx.job.experiment.runner.docker)
        return Plan(task_type="inference", exp_dir=str(ctx.exp_dir), run_id=ctx.run_id, log_dir=str(ctx.log_dir),
                    processes=[spec], after_stop=ctx.job.experiment.cmds.lines("after_stop"),
                    master_addr=host.name, master_port=ctx.master_port, info=self.info(ctx),
                    notes=ctx.notes + [f"results go to {config.output_path}"])

    def info(self, ctx: PlanContext) -> dict[str, Any]:
        output = self._config(ctx).output_path or str(ctx.exp_dir / "outputs" / f"{ctx.run_id}.jsonl")
        return {"output_path": str(Path(output).expanduser().resolve())}

    def _config(self, ctx: PlanContext) -> InferenceConfig:
        return self._checked(ctx, lambda: parse_config(ctx.job.task))

    def _check_prompts(self, ctx: PlanContext, config: InferenceConfig) -> None:
        prompts_file = config.generate.prompts_file
        if not config.prompts and not prompts_file and not config.conversations:
            raise ConfigError(f"inference needs prompts: set {PROMPT_SOURCES}")
        if prompts_file and ctx.hosts[0].is_local and not Path(prompts_file).expanduser().is_file():
            raise ConfigError(self._located(ctx, f"inference.generate.prompts_file {prompts_file} does not exist"))

    def _check_model(self, ctx: PlanContext, model: str) -> None:
        """A model given as a local path that does not exist (hub ids like org/name are left to vLLM)."""
        path = Path(model).expanduser()
        local = model.startswith(("/", "./", "../", "~")) or len(path.parts) > 2
        if not ctx.hosts[0].is_local or not local or path.exists():
            return
        problem = self._located(ctx, f"inference.llm.model {model} does not exist; point it at a Hugging Face model "
                                     "folder, e.g. one written by tools/checkpoint/convert_megatron_to_hf.py")
        if ctx.job.action != "dryrun":
            raise ConfigError(problem)
        ctx.notes.append(problem)

    def _program(self, ctx: PlanContext) -> Program:
        """The built-in program, or experiment.task.entrypoint (a .py file or a module) given --config-json."""
        entry = ctx.job.experiment.task.entrypoint
        if not entry:
            return Program([ctx.job.python, "-m", PROGRAM])
        local = ctx.hosts[0].is_local
        path = Path(entry).expanduser()
        found = path.is_file() if entry.endswith(".py") else True  # a module is left to the host's Python
        if path.name in UPSTREAM_PROGRAMS and not (local and found):
            return self._upstream_program(ctx, entry, UPSTREAM_PROGRAMS[path.name])
        if local and not found:
            raise ConfigError(self._located(ctx, f"experiment.task.entrypoint {entry} does not exist; remove it to "
                                                 f"run the built-in program ({PROGRAM})"))
        return Program([ctx.job.python, entry] if entry.endswith(".py") else [ctx.job.python, "-m", entry])

    def _upstream_program(self, ctx: PlanContext, entry: str, purpose: str | None) -> Program:
        if purpose is not None:
            raise ConfigError(self._located(ctx, f"experiment.task.entrypoint {entry}: upstream's program for "
                                                 f"{purpose} is not supported here; supported: vLLM text generation "
                                                 f"with the built-in program (remove the entrypoint)"))
        return Program([ctx.job.python, "-m", PROGRAM],
                       note=f"experiment.task.entrypoint {entry} is upstream's vLLM text program; the built-in "
                            f"{PROGRAM} runs this config")

    def _checked(self, ctx: PlanContext, check: Callable[[], T]) -> T:
        """Run a check; its ConfigError gains the YAML file:line (or override) that set the key it names."""
        try:
            return check()
        except ConfigError as err:
            raise ConfigError(self._located(ctx, str(err))) from None

    @staticmethod
    def _located(ctx: PlanContext, message: str) -> str:
        match = re.search(r"\b((?:inference|experiment)(?:\.\w+)+)", message)
        if not match or " (in " in message or not _is_set(ctx.job.raw, match.group(1)):
            return message
        where = ctx.job.source.locate(match.group(1))
        return message if where == "the composed config" else f"{message} (in {where})"


def _is_set(data: Any, dotted: str) -> bool:
    """Whether the composed config sets the key (a missing one has no YAML line to show)."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True
