"""The offline-inference schema (upstream FlagScale's `llm` + `generate`) with no vLLM process started:
upstream's shape loads and plans, a missing `llm` or a typo'd key is one line (with a suggestion), keys
for things this project does not run say so, and vLLM's argument names are read without importing it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from flagscale.config.loader import ConfigSource, JobConfig
from flagscale.config.schema import ExperimentConfig, build
from flagscale.exceptions import ConfigError
from flagscale.inference import run_inference
from flagscale.inference.run_inference import VllmNames, parse_config, prompts_of
from flagscale.jobs import prepare
from flagscale.spec.plan import Plan
from tests.conftest import REPO, run_py
from tests.helpers.jobs import dryrun_scripts
from tests.helpers.requires import needs

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = needs(HAS_VLLM, "vLLM is not installed (bash install/install-requirements.sh --env inference)")
EXAMPLE = ("--config-path", "examples/tiny_gpt/conf", "--config-name", "inference")


def upstream_task(model: str = "/models/Aquila-7B", **generate: Any) -> dict[str, Any]:
    """An inference section written as upstream FlagScale writes its text-model YAMLs."""
    return {
        "llm": {"model": model, "tokenizer": model, "trust_remote_code": True, "tensor_parallel_size": 1,
                "pipeline_parallel_size": 1, "gpu_memory_utilization": 0.9, "seed": 1234, "enforce_eager": True},
        "generate": {"prompts": ["Hello, my name is", "The capital of France is"],
                     "sampling": {"top_p": 0.95, "top_k": 1, "temperature": 0.8, "seed": 1234}, **generate},
    }


def plan_of(tmp_path: Path, task: dict[str, Any], entrypoint: str | None = None, action: str = "dryrun") -> Plan:
    experiment = build(ExperimentConfig, {"exp_name": "t", "exp_dir": str(tmp_path / "exp"), "task": {
        "type": "inference", "backend": "vllm", "entrypoint": entrypoint}}, "experiment")
    job = JobConfig(action=action, experiment=experiment, task=task, source=ConfigSource())
    runner, ctx = prepare(job)
    return runner.plan(ctx)


def config_json(plan: Plan) -> dict[str, Any]:
    argv = plan.processes[0].argv
    return json.loads(argv[argv.index("--config-json") + 1])


def test_upstream_shape_loads_and_plans(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, upstream_task(), entrypoint="flagscale/inference/inference_aquila.py")
    argv = plan.processes[0].argv
    assert argv[1:3] == ["-m", "flagscale.inference.run_inference"]
    config = config_json(plan)
    assert config["llm"]["tensor_parallel_size"] == 1 and config["generate"]["sampling"]["top_p"] == 0.95
    assert config["generate"]["prompts"] == ["Hello, my name is", "The capital of France is"]
    assert config["output_path"].startswith(str(tmp_path / "exp" / "outputs"))
    assert any("inference_aquila.py is upstream's vLLM text program" in note for note in plan.notes)
    assert any("inference.llm.model /models/Aquila-7B does not exist" in note for note in plan.notes)
    with pytest.raises(ConfigError, match="inference.llm.model /models/Aquila-7B does not exist; point it at"):
        plan_of(tmp_path, upstream_task(), action="run")
    assert json.loads(parse_config(config).to_json()) == config


def test_prompts_as_one_string_a_file_or_chat_messages(tmp_path: Path) -> None:
    assert parse_config(upstream_task(prompts="A cat")).prompts == ["A cat"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "from the file"}\n')
    config = parse_config(upstream_task(prompts_file=str(prompts)))
    assert prompts_of(config) == ["Hello, my name is", "The capital of France is", "from the file"]
    chat = upstream_task(prompts=[], messages=[{"role": "user", "content": "hi"}])
    assert parse_config(chat).conversations == [[{"role": "user", "content": "hi"}]]
    assert config_json(plan_of(tmp_path, chat))["generate"]["messages"] == [{"role": "user", "content": "hi"}]
    template = tmp_path / "chat.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    assert run_inference.chat_template_of(parse_config(upstream_task(chat_template=str(template)))) == (
        "{{ messages[0]['content'] }}")


@pytest.mark.parametrize(("task", "message"), [
    ({"generate": {"prompts": ["x"]}}, "inference.llm is required: the vllm.LLM arguments, at least inference.llm."),
    ({"llm": {"dtype": "float32"}, "generate": {"prompts": ["x"]}}, "inference.llm.model is required"),
    ({"llm": {"model": "m"}, "generate": {}}, "inference needs prompts: set inference.generate.prompts"),
    ({**upstream_task(), "sampling": {"temperature": 0}}, "inference.sampling is now inference.generate.sampling"),
    ({**upstream_task(), "prompts": ["x"]}, "inference.prompts is now inference.generate.prompts"),
    ({**upstream_task(), "ouput_path": "x"}, "unknown key 'inference.ouput_path'; did you mean 'output_path'?"),
    (upstream_task(promts=["x"]), "unknown key 'inference.generate.promts'; did you mean 'prompts'?"),
    (upstream_task(prompts=[1]), "inference.generate.prompts[0] must be a string"),
    (upstream_task(messages=[[{"content": "hi"}]]), "inference.generate.messages[0]: each message needs a role"),
    (upstream_task(prompts_file="/nonexistent/p.txt"), "inference.generate.prompts_file /nonexistent/p.txt does not"),
])
def test_errors_are_one_line_naming_the_key(tmp_path: Path, task: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        plan_of(tmp_path, task)
    assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(("task", "message"), [
    ({"engine": {"model": "x", "loader": "diffusers"}, "generate": {"prompts": "a cat"}},
     "inference.engine: not supported here (a diffusers/pi0 pipeline engine"),
    ({**upstream_task(), "llm": {"model": "m", "vq_model": "vq"}}, "inference.llm.vq_model: not supported here (Emu3"),
    ({**upstream_task(), "llm": {"model": "m", "processor": "p"}}, "inference.llm.processor: not supported here"),
    (upstream_task(modality="image", mm_data=["a.jpg"]), "inference.generate.mm_data: not supported here (multimodal"),
    (upstream_task(mode="G", ratios=["1:1"]), "inference.generate.mode: not supported here (Emu3"),
    (upstream_task(sampling={"text_top_k": 1024}), "inference.generate.sampling.text_top_k: not supported here"),
])
def test_upstream_keys_this_project_does_not_run(tmp_path: Path, task: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        plan_of(tmp_path, task)
    assert message in str(raised.value) and "supported:" in str(raised.value) and "\n" not in str(raised.value)


def test_entrypoints(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="robobrain2.py: upstream's program for RoboBrain2 .* not supported"):
        plan_of(tmp_path, upstream_task(), entrypoint="flagscale/inference/inference_robobrain2.py")
    with pytest.raises(ConfigError, match="entrypoint /nonexistent/mine.py does not exist"):
        plan_of(tmp_path, upstream_task(), entrypoint="/nonexistent/mine.py")
    mine = tmp_path / "mine.py"
    mine.write_text("")
    assert plan_of(tmp_path, upstream_task(), entrypoint=str(mine)).processes[0].argv[1] == str(mine)
    module = plan_of(tmp_path, upstream_task(), entrypoint="my_pkg.infer").processes[0].argv
    assert module[1:3] == ["-m", "my_pkg.infer"]


@needs_vllm
@pytest.mark.parametrize(("section", "key", "suggestion"), [
    ("llm", "tensor_paralel_size", "did you mean 'tensor_parallel_size'? (vllm.LLM / EngineArgs arguments)"),
    ("sampling", "temprature", "did you mean 'temperature'? (vllm.SamplingParams fields)"),
])
def test_vllm_names_are_checked_before_launch(tmp_path: Path, section: str, key: str, suggestion: str) -> None:
    task = upstream_task()
    target = task["llm"] if section == "llm" else task["generate"]["sampling"]
    target[key] = 1
    with pytest.raises(ConfigError, match=f"unknown key 'inference.*{key}'; {suggestion}".replace("?", r"\?")
                       .replace("(", r"\(").replace(")", r"\)")):
        plan_of(tmp_path, task)


@needs_vllm
def test_names_read_from_source_equal_the_imported_classes() -> None:
    names = VllmNames.from_source()
    assert names is not None and {"model", "kv_cache_memory_bytes", "chat_template"} <= names.llm
    assert names == VllmNames.from_classes()


def test_program_rejects_a_bad_config_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_inference.main(["--config-json", json.dumps({"generate": {"prompts": ["x"]}})]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert run_inference.main(["--config-json", "{"]) == 2
    assert "error: --config-json:" in capsys.readouterr().err


def test_example_dryrun_and_run_py_errors(tmp_path: Path) -> None:
    base = (*EXAMPLE, f"experiment.exp_dir={tmp_path}")
    proc = run_py(*base, "action=dryrun", timeout=120)
    assert proc.returncode == 0, proc.stderr
    (script,) = dryrun_scripts(tmp_path).glob("*.sh")
    text = script.read_text()
    config = json.loads(text.split("--config-json ")[1].split("\n")[0].strip("'"))
    assert config["llm"]["model"] == "outputs/tiny_gpt/hf" and config["generate"]["sampling"]["temperature"] == 0.0
    assert config["generate"]["prompts"][0] == "Once upon a time, there was a little"
    for overrides, message in ((["~inference.llm"], "inference.llm is required"),
                               (["+inference.generate.sampling.temprature=1"], "did you mean 'temperature'"),
                               (["+inference.generate.images=[a.png]"], "inference.generate.images: not supported")):
        if "temprature" in overrides[0] and not HAS_VLLM:
            continue
        bad = run_py(*base, "action=dryrun", *overrides, timeout=120)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_example_is_upstream_shaped() -> None:
    import yaml

    task = yaml.safe_load((REPO / "examples/tiny_gpt/conf/inference/tiny.yaml").read_text())
    assert set(task) == {"llm", "generate"} and set(task["generate"]) == {"prompts", "sampling"}
