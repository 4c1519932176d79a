"""Train -> convert for DeepSeek-V3: the repository's tiny deepseek_v3 example (multi-latent attention, a
sigmoid router with expert bias, group-limited routing, a top-k scaling factor, a shared expert, a dense
first layer, one multi-token-prediction layer), trained briefly with expert parallelism 2 by
`run.py ... train_tiny`, becomes a Hugging Face DeepseekV3ForCausalLM folder whose experts, routers and
routing biases are the checkpoint's own (read back without Megatron) and whose logits equal the Megatron
model's; the MTP layer is dropped with a note. What DeepseekV3 cannot express is refused in one line.

transformers builds the q/kv latent norms with epsilon 1e-6 whatever rms_norm_eps says, and the tiny
example trains with norm_epsilon 1e-5: the logits are compared both as transformers computes them
(close) and with those two norms given the training's epsilon (equal: the mapping itself is exact).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, run_py
from tests.helpers.checkpoints import python_json, refusals, with_args
from tests.integration.test_convert import PROMPT, convert

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ITERS = 3  # odd: the expert bias moves ±rate a step, so after an even count it may be back at 0

# Runs in a fresh interpreter: Megatron's process group and parallel state stay out of pytest.
COMPARE = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from tools.checkpoint import megatron_loader
from transformers import AutoModelForCausalLM, AutoTokenizer
ckpt, hf = sys.argv[2], sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(hf)
ids = tokenizer(sys.argv[4], return_tensors="pt").input_ids
loaded = megatron_loader.load(ckpt)
calls = []  # the cross entropy overwrites the logits in place: keep a copy of each output-layer call
loaded.model.output_layer.register_forward_hook(lambda module, args, out: calls.append(out[0].clone()))
with torch.no_grad():  # with MTP layers Megatron's forward needs labels; the main logits are the last call
    loaded.model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None, labels=ids)
megatron = calls[-1].transpose(0, 1).float()
megatron_loader.shutdown()
model, info = AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True)
model.eval()
with torch.no_grad():
    logits = model(ids).logits.float()
    generated = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    for layer in model.model.layers:
        for norm in (layer.self_attn.q_a_layernorm, layer.self_attn.kv_a_layernorm):
            if norm is not None:
                norm.variance_epsilon = model.config.rms_norm_eps
    same_eps = model(ids).logits.float()
print(json.dumps({"class": type(model).__name__, "missing": sorted(info["missing_keys"]),
                  "unexpected": sorted(info["unexpected_keys"]), "shapes": [list(megatron.shape), list(logits.shape)],
                  "max_abs_diff": (megatron - logits).abs().max().item(),
                  "max_abs_diff_same_eps": (megatron - same_eps).abs().max().item(),
                  "scale": logits.abs().max().item(),
                  "argmax_equal": bool((megatron.argmax(-1) == logits.argmax(-1)).all()),
                  "generated": tokenizer.decode(generated)}))
"""

# The MoE tensors as the distributed checkpoint holds them (experts as global [expert, ...] tensors, whatever
# the expert-parallel shards), read with torch.distributed.checkpoint alone, against the converted tensors.
RAW_MOE = r"""
import json, sys
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
ckpt, hf, layers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
names = {"fc1": "mlp.experts.experts.linear_fc1.weight", "fc2": "mlp.experts.experts.linear_fc2.weight",
         "router": "mlp.router.weight", "bias": "mlp.router.expert_bias",
         "shared_fc1": "mlp.shared_experts.linear_fc1.weight", "shared_fc2": "mlp.shared_experts.linear_fc2.weight"}
metadata = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
keys = [f"decoder.layers.{layer}.{name}" for layer in layers for name in names.values()]
raw = {key: torch.empty(metadata[key].size) for key in keys}
dcp.load(raw, storage_reader=dcp.FileSystemReader(ckpt), no_dist=True)
out = load_file(f"{hf}/model.safetensors")
equal = []
for layer in layers:
    get = lambda short: raw[f"decoder.layers.{layer}.{names[short]}"]
    mlp = f"model.layers.{layer}.mlp."
    equal.append(torch.equal(out[mlp + "gate.weight"], get("router")))
    equal.append(torch.equal(out[mlp + "gate.e_score_correction_bias"], get("bias")))
    shared = mlp + "shared_experts."
    equal.append(torch.equal(torch.cat([out[shared + "gate_proj.weight"], out[shared + "up_proj.weight"]]),
                             get("shared_fc1")))
    equal.append(torch.equal(out[shared + "down_proj.weight"], get("shared_fc2")))
    for e in range(get("fc1").shape[0]):
        expert = f"{mlp}experts.{e}."
        equal.append(torch.equal(torch.cat([out[expert + "gate_proj.weight"], out[expert + "up_proj.weight"]]),
                                 get("fc1")[e]))
        equal.append(torch.equal(out[expert + "down_proj.weight"], get("fc2")[e]))
bias = out[mlp + "gate.e_score_correction_bias"]
moved = any(raw[key].abs().sum() > 0 for key in keys if key.endswith("expert_bias"))
print(json.dumps({"checked": len(equal), "equal": all(equal), "experts": get("fc1").shape[0],
                  "bias_moved": moved, "bias_dtype": str(bias.dtype),
                  "mtp_tensors": sum(name.startswith("mtp") or ".layers.3." in name for name in out)}))
"""

# Every refusal, from the saved arguments alone, in a fresh interpreter (check_compatible reads Megatron's
# MLA defaults): {case: the error message, or null when the conversion is accepted}.
def train_tiny(data: Path, exp: Path, *overrides: str) -> Path:
    """The tiny deepseek_v3 example trained ITERS iterations (saved at the end); its checkpoint folder."""
    proc = run_py("--config-path", str(REPO / "examples/deepseek_v3/conf"), "--config-name", "train_tiny",
                  "action=test", f"experiment.exp_dir={exp}",
                  f"train.data.data_path=[0.7,{data}/stories_text_document,0.3,{data}/facts_text_document]",
                  f"train.data.tokenizer.tokenizer_model={data}/tokenizer", f"train.model.train_iters={ITERS}",
                  f"train.model.eval_interval={ITERS}", "train.model.eval_iters=1",
                  f"train.system.checkpoint.save_interval={ITERS}", "train.model.optimizer.lr_warmup_iters=1",
                  *overrides, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return exp / "checkpoints"


def iteration_dir(checkpoints: Path) -> Path:
    return checkpoints / f"iter_{ITERS:07d}"


@pytest.fixture(scope="module")
def deepseek_checkpoint(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny deepseek_v3 example as it is (experts split over 2 processes, EP=2); its checkpoint folder."""
    return train_tiny(tiny_data, tmp_path_factory.mktemp("deepseek_v3"))


def _converted_matches(checkpoints: Path, hf: Path) -> dict:
    """Compare the converted model's logits with Megatron's; asserts the common expectations."""
    result = python_json("-c", COMPARE, str(REPO), str(checkpoints), str(hf), PROMPT)
    assert result["class"] == "DeepseekV3ForCausalLM" and not result["missing"] and not result["unexpected"], result
    assert result["shapes"][0] == result["shapes"][1], result
    tolerance = 1e-4 * max(1.0, result["scale"])
    assert result["max_abs_diff_same_eps"] < tolerance, result  # the mapping itself
    assert result["max_abs_diff"] < 10 * tolerance and result["argmax_equal"], result  # transformers' latent eps
    assert result["generated"].strip(), result
    return result


def test_deepseek_v3_converts_and_matches_megatron(deepseek_checkpoint: Path, tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    done = convert(deepseek_checkpoint, hf)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "as DeepseekV3ForCausalLM" in done.stdout and "ep=2 (4 experts)" in done.stdout, done.stdout
    assert "note: dropped the 1 multi-token-prediction layer(s)" in done.stdout, done.stdout
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["model_type"] == "deepseek_v3"
    assert {k: config[k] for k in (
        "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
        "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts", "n_group", "topk_group",
        "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace", "rope_interleave",
        "num_nextn_predict_layers", "intermediate_size", "tie_word_embeddings")} == {
        "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 2,
        "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
        "first_k_dense_replace": 1, "rope_interleave": True, "num_nextn_predict_layers": 0,
        "intermediate_size": 128, "tie_word_embeddings": False}  # fmt: skip
    raw = python_json("-c", RAW_MOE, str(iteration_dir(deepseek_checkpoint)), str(hf), "[1, 2]")
    assert raw == {"checked": 2 * (4 + 2 * 4), "equal": True, "experts": 4, "bias_moved": True,
                   "bias_dtype": "torch.float32", "mtp_tensors": 0}, raw  # fmt: skip
    print(_converted_matches(deepseek_checkpoint, hf))


# Expert parallelism 1, a full query projection, YaRN RoPE (its temperature from mscale/mscale_all_dim), tied
# embeddings, no expert bias, no groups, every layer MoE, no MTP, the latent norms' epsilon as transformers has it.
EP1_VARIANT = [
    "train.system.expert_model_parallel_size=1", "train.model.q_lora_rank=null", "+train.model.rope_type=yarn",
    "+train.model.rotary_scaling_factor=4", "+train.model.mscale=0.8", "+train.model.mscale_all_dim=1.0",
    "train.model.untie_embeddings_and_output_weights=false", "train.model.moe_router_enable_expert_bias=false",
    "train.model.moe_router_num_groups=null", "train.model.moe_router_group_topk=null",
    "train.model.moe_layer_freq=1", "train.model.moe_router_topk_scaling_factor=null",
    "train.model.mtp_num_layers=null", "+train.model.norm_epsilon=1e-6",
]  # fmt: skip
MOE_KEYS = (
    "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_layer_freq", "moe_router_topk",
    "moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_bias_update_rate",
    "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_router_num_groups", "moe_router_group_topk",
    "moe_router_topk_scaling_factor", "moe_token_dispatcher_type",
)  # fmt: skip
DENSE_MLA = [*(f"~train.model.{key}" for key in MOE_KEYS), "train.system.expert_model_parallel_size=1"]


@pytest.mark.parametrize("overrides", [EP1_VARIANT, DENSE_MLA], ids=["ep1_yarn_tied_no_bias", "dense_mla"])
def test_deepseek_v3_variants_convert(tiny_data: Path, tmp_path: Path, overrides: list[str]) -> None:
    """The other ways a DeepSeek-like model is set up convert as exactly (EP1_VARIANT), and an MLA model
    without MoE layers becomes a DeepseekV3 whose every layer is dense."""
    checkpoints = train_tiny(tiny_data, tmp_path / "train", *overrides)
    done = convert(checkpoints, tmp_path / "hf")
    assert done.returncode == 0 and "as DeepseekV3ForCausalLM" in done.stdout, done.stderr[-3000:]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    if "~train.model.num_experts" in overrides:
        assert config["first_k_dense_replace"] == 3, config
    else:
        assert config["q_lora_rank"] is None and config["tie_word_embeddings"] and config["n_group"] == 1, config
        assert config["rope_parameters"]["rope_type"] == "yarn" and config["first_k_dense_replace"] == 0, config
        assert "multi-token-prediction" not in done.stdout, done.stdout
    print(_converted_matches(checkpoints, tmp_path / "hf"))


REFUSED = {
    "softmax": ({"moe_router_score_function": "softmax"}, "moe_router_score_function must be sigmoid"),
    "no_qk_layernorm": ({"qk_layernorm": False}, "qk_layernorm must be true"),
    "rotary_interleaved": ({"rotary_interleaved": True}, "rotary_interleaved must be false"),
    "rope_softmax_scale": (
        {"rope_type": "rope", "rotary_scaling_factor": 4.0, "mscale_all_dim": 1.0},
        "must not scale the softmax with rope_type rope",
    ),
    "token_dropping": ({"moe_expert_capacity_factor": 1.0}, "moe_expert_capacity_factor must be unset"),
    "jitter": ({"moe_input_jitter_eps": 0.01}, "moe_input_jitter_eps must be unset"),
    "sinkhorn": ({"moe_router_load_balancing_type": "sinkhorn"}, "must not be sinkhorn"),
    "shared_expert_gate": ({"moe_shared_expert_gate": True}, "moe_shared_expert_gate must be false"),
    "no_shared_expert": (
        {"moe_shared_expert_intermediate_size": None},
        "moe_shared_expert_intermediate_size must be a multiple of moe_ffn_hidden_size (32)",
    ),
    "shared_expert_size": ({"moe_shared_expert_intermediate_size": 48}, "(is 48;"),
    "dense_after_moe": ({"moe_layer_freq": [1, 0, 1]}, "moe_layer_freq must be dense layers first"),
    "one_expert_groups": ({"moe_router_num_groups": 4}, "moe_router_group_topk (1 of 4 groups)"),
    "group_ranking": ({"moe_router_topk": 1}, "must select all groups or be half of moe_router_topk (1)"),
    "linear_bias": ({"disable_bias_linear": False}, "disable_bias_linear must be true"),
}
ACCEPTED = {
    "all_groups": {"moe_router_group_topk": 2},
    "no_mtp": {"mtp_num_layers": None},
    "pre_softmax_with_sigmoid": {"moe_router_pre_softmax": True},  # Megatron-Core ignores it for sigmoid scores
}


def test_what_deepseek_v3_cannot_express_is_refused(deepseek_checkpoint: Path) -> None:
    cases = {case: changes for case, (changes, _) in REFUSED.items()} | ACCEPTED
    results = refusals(iteration_dir(deepseek_checkpoint) / "common.pt",
                       "tools.checkpoint.deepseek_v3_mapping:check_compatible", cases)
    for case, (_, message) in REFUSED.items():
        assert results[case] and message in results[case], (case, results[case])
        assert results[case].startswith("this checkpoint has no Hugging Face DeepseekV3 equivalent: "), results[case]
    assert {case: results[case] for case in ACCEPTED} == dict.fromkeys(ACCEPTED), results


def test_refusal_is_one_line_before_any_weight_is_read(deepseek_checkpoint: Path, tmp_path: Path) -> None:
    checkpoints = with_args(deepseek_checkpoint, iteration_dir(deepseek_checkpoint).name, tmp_path / "ckpt",
                            moe_router_score_function="softmax", moe_shared_expert_gate=True)
    done = convert(checkpoints, tmp_path / "hf")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: this checkpoint has no Hugging Face DeepseekV3 equivalent: "), done.stderr
    assert "moe_router_score_function must be sigmoid" in done.stderr, done.stderr
    assert "moe_shared_expert_gate must be false" in done.stderr and not (tmp_path / "hf").exists()
