"""Train -> convert for MoE: a tiny Mixtral-like model (softmax top-2 router, GQA, SwiGLU experts) trained
with expert parallelism 2 on 2 CPU processes becomes a Hugging Face MixtralForCausalLM folder whose
experts are the checkpoint's own (read back from the distributed checkpoint without Megatron) and whose
logits equal the Megatron model's; a checkpoint whose routing or architecture Mixtral cannot express is
refused in one line, before any weights are read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers.checkpoints import python_json, refusals, with_args
from tests.integration.test_convert import PROMPT, convert
from tests.integration.test_train_moe import EXPERT_PARALLEL, MIXTRAL
from tests.integration.test_train_program import data_args, torchrun

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# head_dim 32 (as the dense tiny model): vLLM's CPU attention has no kernel for 16.
TINY_MIXTRAL = [*MIXTRAL, "--kv-channels", "32", "--moe-ffn-hidden-size", "96"]
ITERATION_DIR = "iter_0000020"

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
with torch.no_grad():
    megatron = loaded.model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None).float()
megatron_loader.shutdown()
model, info = AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True)
model.eval()
with torch.no_grad():
    logits = model(ids).logits.float()
    generated = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
print(json.dumps({"class": type(model).__name__, "missing": sorted(info["missing_keys"]),
                  "unexpected": sorted(info["unexpected_keys"]),
                  "max_abs_diff": (megatron - logits).abs().max().item(), "scale": logits.abs().max().item(),
                  "argmax_equal": bool((megatron.argmax(-1) == logits.argmax(-1)).all()),
                  "generated": tokenizer.decode(generated)}))
"""

# The experts and routers as the distributed checkpoint holds them (global [layer, expert, ...] tensors),
# read with torch.distributed.checkpoint alone, against the converted Mixtral tensors.
RAW_EXPERTS = r"""
import json, sys
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
ckpt, hf = sys.argv[1], sys.argv[2]
keys = {"fc1": "decoder.layers.mlp.experts.experts.linear_fc1.weight",
        "fc2": "decoder.layers.mlp.experts.experts.linear_fc2.weight", "router": "decoder.layers.mlp.router.weight"}
metadata = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
raw = {key: torch.empty(metadata[key].size) for key in keys.values()}
dcp.load(raw, storage_reader=dcp.FileSystemReader(ckpt), no_dist=True)
fc1, fc2, router = (raw[keys[k]] for k in ("fc1", "fc2", "router"))
out = load_file(f"{hf}/model.safetensors")
equal = []
for layer in range(fc1.shape[0]):
    moe = f"model.layers.{layer}.block_sparse_moe."
    equal.append(torch.equal(out[moe + "gate.weight"], router[layer]))
    for e in range(fc1.shape[1]):
        names = f"{moe}experts.{e}."
        equal.append(torch.equal(torch.cat([out[names + "w1.weight"], out[names + "w3.weight"]]), fc1[layer, e]))
        equal.append(torch.equal(out[names + "w2.weight"], fc2[layer, e]))
print(json.dumps({"checked": len(equal), "equal": all(equal), "shape": list(fc1.shape),
                  "distinct_experts": len({fc2[0, e].sum().item() for e in range(fc1.shape[1])})}))
"""


@pytest.fixture(scope="module")
def mixtral_checkpoint(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Mixtral trained 20 iterations with expert parallelism 2; its checkpoint folder."""
    root = tmp_path_factory.mktemp("mixtral")
    run = torchrun(*TINY_MIXTRAL, *data_args(tiny_data), *EXPERT_PARALLEL, "--train-iters", "20",
                   "--log-interval", "5", "--save", str(root / "checkpoints"), "--save-interval", "20",
                   timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    return root / "checkpoints"


def test_mixtral_converts_and_matches_megatron(mixtral_checkpoint: Path, tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    done = convert(mixtral_checkpoint, hf)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "as MixtralForCausalLM" in done.stdout and "ep=2 (4 experts)" in done.stdout, done.stdout
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert {k: config[k] for k in ("num_local_experts", "num_experts_per_tok", "intermediate_size", "head_dim",
                                   "num_key_value_heads", "router_jitter_noise", "tie_word_embeddings")} == {
        "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96, "head_dim": 32,
        "num_key_value_heads": 2, "router_jitter_noise": 0.0, "tie_word_embeddings": False}  # fmt: skip
    raw = python_json("-c", RAW_EXPERTS, str(mixtral_checkpoint / ITERATION_DIR), str(hf))
    assert raw == {"checked": 2 * (1 + 2 * 4), "equal": True, "shape": [2, 4, 192, 64], "distinct_experts": 4}, raw
    result = python_json("-c", COMPARE, str(REPO), str(mixtral_checkpoint), str(hf), PROMPT)
    assert result["class"] == "MixtralForCausalLM" and not result["missing"] and not result["unexpected"], result
    assert result["max_abs_diff"] < 1e-4 * max(1.0, result["scale"]), result
    assert result["argmax_equal"], result
    assert result["generated"].strip(), result


MIXTRAL_REFUSED = {
    "mla": ({"multi_latent_attention": True}, "no Hugging Face DeepseekV3 equivalent: qk_layernorm must be true"),
    "pre_softmax": ({"moe_router_pre_softmax": True}, "moe_router_pre_softmax must be false"),
    "sigmoid": ({"moe_router_score_function": "sigmoid"}, "moe_router_score_function must be softmax"),
    "shared_expert": ({"moe_shared_expert_intermediate_size": 64}, "Mixtral has no shared expert"),
    "token_dropping": ({"moe_expert_capacity_factor": 1.0}, "moe_expert_capacity_factor must be unset"),
    "dense_layer": ({"moe_layer_freq": [0, 1]}, "every layer must be an MoE layer"),
}


def test_what_mixtral_cannot_express_is_refused(mixtral_checkpoint: Path) -> None:
    """The converter's check (which picks the mapping from the saved arguments) on each changed copy."""
    cases = {case: changes for case, (changes, _) in MIXTRAL_REFUSED.items()}
    found = refusals(mixtral_checkpoint / ITERATION_DIR / "common.pt", "tools.checkpoint.convert_megatron_to_hf:check",
                     cases)  # fmt: skip
    for case, (_, message) in MIXTRAL_REFUSED.items():
        assert found[case] and message in found[case], (case, found[case])
    assert refusals(mixtral_checkpoint / ITERATION_DIR / "common.pt", "tools.checkpoint.convert_megatron_to_hf:check",
                    {"as_trained": {}}) == {"as_trained": None}  # fmt: skip


def test_a_refusal_is_one_line_before_any_weight_is_read(mixtral_checkpoint: Path, tmp_path: Path) -> None:
    """Refused from the saved arguments alone: the copy has no weights to read."""
    done = convert(with_args(mixtral_checkpoint, ITERATION_DIR, tmp_path / "ckpt", moe_layer_freq=[0, 1]),
                   tmp_path / "hf")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "every layer must be an MoE layer" in done.stderr, done.stderr
    assert done.stderr.startswith("error: ") and not (tmp_path / "hf").exists()
