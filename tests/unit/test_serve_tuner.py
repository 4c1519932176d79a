"""The serving auto-tuner without servers: its config (upstream's serve tuner blocks included), the search on a
synthetic landscape (finds the best under the SLO in under half the grid's trials, prunes past an OOM, skips an
engine that cannot win), history rows, the load profile's prompts, and the tuner's orchestration with a fake trial
(trial jobs, resume without re-running, best.yaml, the message when no configuration meets the SLO)."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import pytest
import yaml

from flagscale.auto_tuner.history import History, TrialStatus
from flagscale.auto_tuner.serve import tuner as tuner_module
from flagscale.auto_tuner.serve.config import load_serve_tuner_config
from flagscale.auto_tuner.serve.history import SERVE_ROWS, ServeResult
from flagscale.auto_tuner.serve.search import Objective, ServeSearch, needs_more_memory
from flagscale.auto_tuner.serve.space import ServeCandidate
from flagscale.config.loader import load_job_config
from flagscale.exceptions import ConfigError
from flagscale.main import compose_config
from flagscale.serve.loadgen import LoadProfile
from tests.conftest import REPO
from tests.unit.test_auto_tuner_config import UPSTREAM_SERVE, upstream_block

UPSTREAM_ATMB = """
engines: [vllm, sglang, llama_cpp]
space:
  vllm:
    tensor_model_parallel_size: [1,2,4]
    pipeline_model_parallel_size: "auto"
    block_size: [32, 64]
    max_num_batched_tokens: [512, 1024, 2048]
    max_num_seqs: [128, 256]
  llama_cpp:
    threads: [32]
    split_mode: [none, layer, row]
  sglang:
    tensor_model_parallel_size: [4]
    pipeline_model_parallel_size: [1]
    chunked_prefill_size: [128, 256, 512]
    page_size: [16, 32]
    max_running_requests: [32, 64, 128]
cards: 4
control:
  interval: 10
  run_best: False
"""


def test_upstream_multi_backend_block_loads() -> None:
    config = load_serve_tuner_config(yaml.safe_load(UPSTREAM_ATMB), "sglang", devices=1)
    assert config.engines == ["vllm", "sglang", "llama_cpp"] and config.devices == 4
    assert config.space["vllm"]["tensor_parallel_size"] == [1, 2, 4]
    assert config.space["vllm"]["pipeline_parallel_size"] == [1, 2, 4]  # auto: divisors of cards
    assert config.space["llama_cpp"] == {"threads": [32], "split_mode": ["none", "layer", "row"]}
    assert config.space["sglang"]["chunked_prefill_size"] == [128, 256, 512]
    notes = "\n".join(config.notes)
    assert "tensor_model_parallel_size (upstream) read as tensor_parallel_size" in notes
    assert "control.interval" in notes and not config.control.run_best


def test_upstream_flat_space_is_the_deployments_engine() -> None:
    config = load_serve_tuner_config(upstream_block(UPSTREAM_SERVE), "vllm", devices=2)  # qwen2_5's
    assert config.engines == ["vllm"]
    assert config.space["vllm"]["tensor_parallel_size"] == [1, 2]
    assert config.space["vllm"]["block_size"] == [8, 16, 32]


@pytest.mark.parametrize(("block", "message"), [
    ({"enignes": ["vllm"]}, "did you mean 'engines'"),
    ({"space": {"llama_cpp": {"threads": [1]}}}, "llama_cpp is not in experiment.auto_tuner.engines"),
    ({"space": {"max_num_seqs": "auto"}}, "'auto' stands for the divisors of the devices"),
    ({"space": {"max_num_seqs": []}}, "must be a non-empty list"),
    ({"performance": {"metric": "tokens"}}, "performance metric 'tokens'"),
    ({"performance": {"slo": {"ttft_p95": 5}}}, "did you mean 'ttft_p95_ms'"),
    ({"performance": {"metric": "itl", "order": "descend"}}, "order: descend contradicts metric itl_mean_ms"),
    ({"algo": {"name": "bayes"}}, "only name: grid is implemented"),
    ({"control": {"search": "random"}}, "control.search must be one of climb, grid"),
])
def test_bad_blocks_end_in_one_line(block: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_serve_tuner_config(block, "vllm", devices=1)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_upstream_metric_names_and_grid() -> None:
    config = load_serve_tuner_config({"performance": {"metric": "itl", "order": "ascend"}, "algo": {"name": "grid"}},
                                     "vllm", devices=1)
    assert config.performance.metric == "itl_mean_ms" and not config.performance.higher_is_better
    assert config.control.search == "grid"


# --- the search on a synthetic landscape -------------------------------------------------------------------------

SLOTS, THREADS, BATCH = [1, 2, 4, 8, 16], [1, 2, 4], [16, 64, 256, 1024]
ORDER = {"llama_cpp": {"parallel": SLOTS, "threads": THREADS, "batch_size": BATCH}, "vllm": {"max_num_seqs": [2, 8]}}
OBJECTIVE = Objective(metric="output_tokens_per_s", slo={"itl_p95_ms": 6.0})


def landscape(c: ServeCandidate) -> dict[str, float]:
    """Throughput grows with slots and threads (saturating), peaks at batch 256; ITL grows with slots."""
    v = c.values
    if c.engine == "vllm":
        return {"output_tokens_per_s": 400.0 * v["max_num_seqs"] ** 0.5, "itl_p95_ms": 4.0}
    tokens = 1000 * (1 - math.exp(-v["parallel"] / 4)) * v["threads"] ** 0.6 * (1 - 0.1 * abs(math.log(
        v["batch_size"] / 256, 4)))
    return {"output_tokens_per_s": tokens, "itl_p95_ms": 1.0 * v["parallel"] / v["threads"] ** 0.5}


def candidates() -> list[ServeCandidate]:
    out = [ServeCandidate("vllm", (("max_num_seqs", s),)) for s in ORDER["vllm"]["max_num_seqs"]]
    out += [ServeCandidate("llama_cpp", (("parallel", p), ("threads", t), ("batch_size", b)))
            for p, t, b in itertools.product(SLOTS, THREADS, BATCH)]
    return out


def result(trial: int, c: ServeCandidate, status: TrialStatus = TrialStatus.OK) -> ServeResult:
    figures = landscape(c) if status is TrialStatus.OK else {}
    return ServeResult(trial=trial, candidate=c, status=status, figures=figures)


def drive(search: ServeSearch, limit: int = 200, oom=lambda c: False) -> list[ServeResult]:
    done: dict[str, ServeResult] = {}
    for trial in range(1, limit + 1):
        step = search.next(done)
        if step.candidate is None:
            break
        status = TrialStatus.OOM if oom(step.candidate) else TrialStatus.OK
        done[step.candidate.key] = result(trial, step.candidate, status)
    return list(done.values())


TARGETS = {"llama_cpp": {"parallel": 2, "threads": 2, "batch_size": 64}, "vllm": {"max_num_seqs": 2}}


def test_climb_finds_the_best_under_the_slo_in_under_half_the_grid() -> None:
    space = candidates()
    grid_best = OBJECTIVE.best([result(i, c) for i, c in enumerate(space, 1)])
    assert grid_best is not None and grid_best.candidate.values["parallel"] < 16  # the SLO binds: 16 slots miss it
    unconstrained = max(space, key=lambda c: landscape(c)["output_tokens_per_s"])
    assert unconstrained != grid_best.candidate
    search = ServeSearch(space, ORDER, TARGETS, OBJECTIVE)
    tried = drive(search)
    best = OBJECTIVE.best(tried)
    assert best is not None and best.candidate == grid_best.candidate
    assert len(tried) <= len(space) / 2, len(tried)
    assert tried[0].candidate == ServeCandidate("vllm", (("max_num_seqs", 2),))  # scouts: the configured settings
    assert tried[1].candidate.values == TARGETS["llama_cpp"]
    vllm_fates = {search.fates.get(c.key, "") for c in space if c.engine == "vllm" and c.key not in
                  {r.candidate.key for r in tried}}
    assert all(f.startswith("skipped: vllm's best") for f in vllm_fates)  # 400-570 tokens/s cannot reach ~1500


def test_grid_tries_every_candidate_in_order() -> None:
    space = candidates()
    tried = drive(ServeSearch(space, ORDER, TARGETS, OBJECTIVE, search="grid"))
    assert [r.candidate for r in tried] == space


def test_an_oom_prunes_every_candidate_needing_more_memory() -> None:
    a = ServeCandidate("llama_cpp", (("parallel", 8), ("threads", 2), ("batch_size", 256)))
    assert needs_more_memory(a.with_value("parallel", 16), a)
    assert needs_more_memory(a.with_value("batch_size", 1024), a)
    assert not needs_more_memory(a.with_value("parallel", 4), a)
    assert not needs_more_memory(a.with_value("threads", 4), a)  # threads is not a memory knob: not comparable
    search = ServeSearch(candidates(), ORDER, TARGETS, OBJECTIVE)
    tried = drive(search, oom=lambda c: c.engine == "llama_cpp" and c.values["parallel"] >= 4)
    keys = {r.candidate.key for r in tried}
    assert not any(c.values.get("parallel", 0) >= 8 and c.key in keys and c.values["threads"] == 2
                   and c.values["batch_size"] == 64 for c in candidates())
    assert any(f.startswith("pruned: needs at least the memory of trial") for f in search.fates.values())


def test_slo_violation_ranks_below_and_closest() -> None:
    fast = ServeCandidate("llama_cpp", (("parallel", 16), ("threads", 1), ("batch_size", 256)))
    slow = ServeCandidate("llama_cpp", (("parallel", 1), ("threads", 4), ("batch_size", 256)))
    strict = Objective(metric="output_tokens_per_s", slo={"itl_p95_ms": 0.1})
    a, b = result(1, fast), result(2, slow)
    assert strict.best([a, b]) is None and strict.closest([a, b]) == b  # b's ITL is nearer the bound
    assert strict.violation(b) == pytest.approx(landscape(slow)["itl_p95_ms"] / 0.1 - 1)


# --- history and load profile ------------------------------------------------------------------------------------

def test_history_rows_round_trip_and_refuse_another_deployment(tmp_path: Path) -> None:
    c = ServeCandidate("vllm", (("max_num_seqs", 8), ("enable_chunked_prefill", False), ("block_size", None)))
    r = ServeResult(trial=3, candidate=c, status=TrialStatus.OK, figures={"output_tokens_per_s": 12.5,
                    "ttft_p95_ms": 3.25}, startup_s=20.0, elapsed_s=31.0, fingerprint="fp")
    history = History(tmp_path / "history.csv", "fp", SERVE_ROWS)
    history.append(r)
    again = History(tmp_path / "history.csv", "fp", SERVE_ROWS).results[0]
    assert again.candidate == c and again.figures["output_tokens_per_s"] == 12.5 and again.figures["itl_p50_ms"] is None
    assert again.startup_s == 20.0 and again.status is TrialStatus.OK
    with pytest.raises(ConfigError, match="different deployment"):
        History(tmp_path / "history.csv", "other", SERVE_ROWS, "deployment, load profile or hosts")


def test_profile_prompts_are_token_ids_of_the_drawn_lengths_and_repeatable() -> None:
    profile = LoadProfile(prefix_len=4, input_len=20, output_len=10, num_prompts=50, range_ratio=0.5, concurrency=8)
    spec = profile.spec("http://x/v1", "m", vocab_size=100)
    assert spec.requests == 50 and spec.concurrency == 8 and spec.warmup == 2
    lengths = [len(p) for p in spec.prompts]
    assert min(lengths) >= 4 + 10 and max(lengths) <= 4 + 20 and len(set(lengths)) > 3
    assert all(0 <= t < 100 for p in spec.prompts for t in p) and len({p[:4] for p in spec.prompts}) == 1
    assert all(5 <= n <= 10 for n in spec.output_lens) and profile.longest == 34
    assert profile.spec("http://x/v1", "m", vocab_size=100) == spec  # the same seed: the same load every trial
    assert LoadProfile(num_prompts=5).spec("u", "m", 10).concurrency == 5  # upstream: all at once


# --- the tuner with a fake trial ---------------------------------------------------------------------------------

def fake_models(tmp_path: Path) -> tuple[Path, Path]:
    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(json.dumps({"vocab_size": 1024, "max_position_embeddings": 128,
                                                "num_attention_heads": 4}))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    return hf, gguf


def tune_job(tmp_path: Path, *extra: str):
    hf, gguf = fake_models(tmp_path)
    overrides = [f"experiment.exp_dir={tmp_path / 'exp'}", f"serve.0.engine_args.model={hf}",
                 f"serve.0.engine_args_specific.llama_cpp.model={gguf}", "+serve.0.profile.vocab_size=1024", *extra]
    cfg, source = compose_config(REPO / "examples/tiny_gpt/conf", "serve_auto_tune", overrides)
    return load_job_config(cfg, source)


class FakeServer:
    """The landscape above as measured figures (vLLM ~ 400-570 tokens/s; llama.cpp up to ~1,600)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.runs: list = []
        self.stop_after = stop_after

    def __call__(self, run, on_progress) -> ServeResult:
        if self.stop_after is not None and len(self.runs) == self.stop_after:
            raise KeyboardInterrupt
        self.runs.append(run)
        c = run.candidate
        values = {"parallel": 2, "threads": 2, "batch_size": 64, **c.values}
        figures = landscape(ServeCandidate(c.engine, tuple(values.items()) if c.engine == "llama_cpp" else c.settings))
        figures["ttft_p95_ms"] = 100.0 / values["parallel"]
        return ServeResult(trial=run.trial, candidate=c, status=TrialStatus.OK, figures=figures, startup_s=1.0,
                           exp_dir=str(run.exp_dir), fingerprint=run.fingerprint)


def test_tuner_runs_trials_writes_best_and_resumes_without_rerunning(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    first = FakeServer(stop_after=3)
    monkeypatch.setattr(tuner_module, "run_serve_trial", first)
    assert tuner_module.serve_auto_tune(tune_job(tmp_path)) == 130  # Ctrl-C during the 4th trial
    out = tmp_path / "exp" / "auto_tuner"
    run = first.runs[0]
    assert run.job.exp_dir == out / "trial_1" and run.job.action == "run" and run.job.experiment.auto_tuner is None
    item = run.job.raw["serve"][0]
    assert item["engine"] == "vllm" and item["engine_args_specific"]["vllm"]["max_num_seqs"] == 2
    assert run.profile.num_prompts == 128 and run.vocab_size == 1024
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert len(rows) == 3
    again = FakeServer()
    monkeypatch.setattr(tuner_module, "run_serve_trial", again)
    assert tuner_module.serve_auto_tune(tune_job(tmp_path, "serve.0.engine_args.port=8123")) == 0  # another port
    keys = [r["key"] for r in csv.DictReader((out / "history.csv").open())]
    assert len(keys) == len(set(keys)) == 3 + len(again.runs)  # nothing recorded ran again
    assert {r.candidate.key for r in again.runs}.isdisjoint(row["key"] for row in rows)
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["action"] == "run" and best["experiment"]["exp_dir"] == str(tmp_path / "exp")
    assert best["serve"][0]["engine"] == "llama_cpp"
    chosen = best["serve"][0]["engine_args_specific"]["llama_cpp"]
    assert chosen == {"model": chosen["model"], "threads": 2, "batch_size": 256, "parallel": 8}  # the grid's best
    assert len(first.runs) + len(again.runs) <= 13  # of 26
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert len(summary) == 26 and all(row["fate"] for row in summary)
    assert any(row["fate"].startswith("not tried: no neighbour of llama_cpp's best") for row in summary)


def test_an_slo_no_configuration_meets_names_the_closest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(tuner_module, "run_serve_trial", FakeServer())
    code = tuner_module.serve_auto_tune(tune_job(tmp_path, "experiment.auto_tuner.performance.slo.ttft_p95_ms=0.5"))
    out = capsys.readouterr().out
    assert code == 1 and "no configuration meets the SLO" in out and "the closest is trial" in out
    assert "parallel=8" in out.split("the closest is trial")[1].splitlines()[0]  # 100/8 ms: nearest the bound
    assert not (tmp_path / "exp" / "auto_tuner" / "best.yaml").exists()


def test_a_load_no_candidate_can_hold_is_one_error_before_any_trial(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeServer()
    monkeypatch.setattr(tuner_module, "run_serve_trial", fake)
    with pytest.raises(ConfigError, match="the load's longest request needs 232"):
        tuner_module.serve_auto_tune(tune_job(tmp_path, "serve.0.profile.input_len=200"))
    assert not fake.runs


def test_vllm_settings_vllm_would_refuse_are_pruned_before_any_trial(tmp_path: Path) -> None:
    from flagscale.auto_tuner.serve.space import fit_problems, generate, trial_item
    from flagscale.serve.engines import engine_for
    from flagscale.serve.engines.base import Endpoint

    hf, _ = fake_models(tmp_path)
    item = {"serve_id": "m", "engine": "vllm", "engine_args": {"model": str(hf), "max_model_len": 128}}
    config = load_serve_tuner_config({"space": {"vllm": {
        "max_num_seqs": [8, 64], "max_num_batched_tokens": [32, 256], "enable_chunked_prefill": [True, False],
        "tensor_model_parallel_size": [1, 2, 3]}}}, "vllm", devices=2)
    profile = LoadProfile(input_len=48, output_len=32)
    fates = {c.key: fit_problems(item, c, profile, config.devices) for c in generate(config)}
    assert len(fates) == 24
    ok = [k for k, problems in fates.items() if not problems]
    assert all("tensor_parallel_size=3" not in k for k in ok)  # 3 devices > 2; 3 does not divide 4 heads
    assert all(not ("max_num_seqs=64" in k and "max_num_batched_tokens=32" in k) for k in ok)
    assert all(not ("max_num_batched_tokens=32" in k and "enable_chunked_prefill=false" in k) for k in ok)
    assert "vllm:max_num_seqs=8,max_num_batched_tokens=32,enable_chunked_prefill=true,tensor_parallel_size=2" in ok
    reasons = " ".join(" ".join(p) for p in fates.values())
    assert "needs 3 devices, 2 available" in reasons and "does not divide the model's 4 attention heads" in reasons
    assert "< max_model_len 128 without chunked prefill" in reasons and "< max_num_seqs 64" in reasons
    # the trial's server turns chunked prefill off for real: vLLM's default is on, so false is --no-...
    off = ServeCandidate("vllm", (("enable_chunked_prefill", False),))
    deployment = tuner_module.deployment_of(trial_item(item, off), off)
    argv = engine_for("vllm").argv("python", deployment, Endpoint(bind_host="127.0.0.1", port=1,
                                                                  connect_host="127.0.0.1"))
    assert "--no-enable-chunked-prefill" in argv and "--enable-chunked-prefill" not in argv


def test_upstream_instance_is_servers_the_load_is_spread_over(tmp_path: Path) -> None:
    from flagscale.auto_tuner.serve.space import fit_problems, generate, trial_item

    config = load_serve_tuner_config({"space": {"instance": [1, 2, 4], "max_num_seqs": [4]}}, "llama_cpp", devices=2)
    assert config.space["llama_cpp"]["num_replicas"] == [1, 2, 4]
    assert any("instance (upstream) read as num_replicas" in n for n in config.notes)
    _, gguf = fake_models(tmp_path)
    item = {"serve_id": "m", "engine": "llama_cpp", "engine_args": {"model": str(gguf), "max_model_len": 128}}
    candidates = generate(config)
    two = trial_item(item, candidates[1])
    assert two["resources"] == {"num_replicas": 2} and "num_replicas" not in two["engine_args_specific"]["llama_cpp"]
    profile = LoadProfile(input_len=48, output_len=32)
    assert [fit_problems(item, c, profile, 2) for c in candidates[:2]] == [[], []]
    assert fit_problems(item, candidates[2], profile, 2) == [
        "needs 4 devices (4 servers of 1), 2 available (experiment.auto_tuner.cards)"]


def test_a_launch_that_starts_nothing_ends_the_session_a_server_that_dies_is_a_failed_trial(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flagscale.auto_tuner.serve import trial as trial_module
    from flagscale.exceptions import LaunchError

    tuner = tuner_module.ServeTuner(tune_job(tmp_path))
    run = tuner.trial_run(1, ServeCandidate("llama_cpp", (("parallel", 2),)))

    def port_in_use(job, **_):
        raise LaunchError("host localhost: port 8000 is in use; nothing was started")

    monkeypatch.setattr(trial_module.jobs, "launch", port_in_use)
    with pytest.raises(LaunchError, match="port 8000 is in use"):
        trial_module.run_serve_trial(run)

    def server_dies(job, **_):
        job.exp_dir.mkdir(parents=True, exist_ok=True)
        (job.exp_dir / "job.json").write_text("{}")
        raise LaunchError("the job is FAILED: http://127.0.0.1:8000/health does not answer; stopped the job. Last "
                          "lines of x.log:\nValueError: max_num_batched_tokens (32) must be greater than or equal")

    monkeypatch.setattr(trial_module.jobs, "launch", server_dies)
    failed = trial_module.run_serve_trial(run)
    assert failed.status is TrialStatus.FAILED and "ValueError: max_num_batched_tokens (32)" in failed.reason


def test_max_trials_stops_the_search_and_run_best_serves_the_best(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeServer()
    monkeypatch.setattr(tuner_module, "run_serve_trial", fake)
    served = []
    job = tune_job(tmp_path, "experiment.auto_tuner.control.max_trials=3",
                   "+experiment.auto_tuner.control.run_best=true")
    assert tuner_module.serve_auto_tune(job, run_job=lambda best: served.append(best) or 0) == 0
    assert len(fake.runs) == 3 and "search ended: max_trials (3) reached" in capsys.readouterr().out
    (best,) = served
    assert best.action == "run" and best.exp_dir == tmp_path / "exp" and best.raw["serve"][0]["engine"] == "vllm"
    assert best.raw["serve"][0]["engine_args_specific"]["vllm"]["max_num_seqs"] == 8  # 1,131 > 566 and 537 tokens/s
