"""Megatron-LM's and torchrun's argument vocabularies as data, with YAML-value checking.

The tables live in `flagscale/config/data/*.json`, written by `tools/compat/extract_arguments.py`
from Megatron-LM core_v0.16.1 megatron/training/arguments.py (plus the config dataclasses it turns
into options and pretrain_gpt.py's extra ModelOpt options), upstream FlagScale's additions, and
torchrun's live parser. Stdlib only (no torch): loading takes a few milliseconds and is cached.

Keys are YAML keys: an option spelling without its leading dashes, dashes turned into underscores.
Every spelling of an option is its own entry (`save_interval` and `persistent_save_interval` both
exist, with the same `dest` and the same `options`); a store_false option is keyed by its own
spelling (`no_masked_softmax_fusion`, kind "negated_flag", dest `masked_softmax_fusion`).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from flagscale.exceptions import ConfigError

DATA_DIR = Path(__file__).with_name("data")
Kind = Literal["flag", "negated_flag", "value", "list"]
Category = Literal["used", "cuda_only", "inert", "not_implemented"]
_TRUE, _FALSE = ("true",), ("false",)
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


@dataclass(frozen=True, slots=True)
class Argument:
    """One option spelling: `name` is the YAML key, `options` every spelling of the same option."""

    name: str
    options: tuple[str, ...]
    kind: Kind
    type: str | None
    default: Any
    choices: tuple[Any, ...] | None
    group: str | None
    source: str
    dest: str
    nargs: int | str | None = None
    flagscale_choices: tuple[Any, ...] = ()
    """Choices upstream FlagScale adds to a Megatron-LM option (already included in `choices`)."""


def normalize_key(key: str) -> str:
    """`--tensor-model-parallel-size` / `tensor-model-parallel-size` -> `tensor_model_parallel_size`."""
    return key.strip().lstrip("-").replace("-", "_")


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _argument(entry: Mapping[str, Any]) -> Argument:
    choices = entry.get("choices")
    return Argument(
        name=entry["name"], options=tuple(entry["options"]), kind=entry["kind"], type=entry["type"],
        default=_frozen(entry["default"]), choices=None if choices is None else tuple(choices),
        group=entry.get("group"), source=entry["source"], dest=entry["dest"], nargs=entry.get("nargs"),
        flagscale_choices=tuple(entry.get("flagscale_choices") or ()),
    )


class _Table(Mapping[str, Argument]):
    """Read-only name -> Argument; each Argument is built on first access (keeps loading to the JSON parse)."""

    __slots__ = ("_built", "_raw")

    def __init__(self, raw: dict[str, Mapping[str, Any]]) -> None:
        self._raw, self._built = raw, {}

    def __getitem__(self, key: str) -> Argument:
        arg = self._built.get(key)
        if arg is None:
            arg = self._built[key] = _argument(self._raw[key])
        return arg

    def __contains__(self, key: object) -> bool:
        return key in self._raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


def _load(filename: str, key: str) -> Mapping[str, Argument]:
    entries = json.loads((DATA_DIR / filename).read_text(encoding="utf-8"))[key]
    return _Table({e["name"]: e for e in entries})


@cache
def megatron_arguments() -> Mapping[str, Argument]:
    """Megatron-LM (core_v0.16.1) and upstream FlagScale training options, by YAML key."""
    return _load("megatron_arguments.json", "arguments")


@cache
def torchrun_options() -> Mapping[str, Argument]:
    """torchrun's options (`nnodes`, `nproc_per_node`, `rdzv_id`, ...), by YAML key."""
    return _load("torchrun_options.json", "options")


@cache
def metadata(table: Literal["megatron", "torchrun"] = "megatron") -> Mapping[str, Any]:
    """Where a table came from: source repositories, refs, commits and the generator command."""
    name = "megatron_arguments.json" if table == "megatron" else "torchrun_options.json"
    return MappingProxyType(json.loads((DATA_DIR / name).read_text(encoding="utf-8"))["meta"])


def suggest(key: str, known: Iterable[str]) -> str | None:
    """The known name closest to `key` (e.g. `num_layers` for `num_layer`), or None."""
    matches = difflib.get_close_matches(normalize_key(key), list(known), n=1, cutoff=0.75)
    return matches[0] if matches else None


# ----------------------------------------------------------------------------- value checking


class _Reject(ValueError):
    """A value that does not fit; the message says what was expected."""


def coerce(arg: Argument, value: Any, where: str) -> Any:
    """`value` (from YAML) as argparse would take it for `arg`; ConfigError naming key, value and `where`.

    Numbers given as strings ('1', '1e-5') become int/float per `arg.type`; flags take true/false
    (or the strings 'true'/'false'); lists are checked element by element; choices are enforced.
    None means "not set" and is returned as is. The few `type=bool` value options (onnx_safe,
    lazy_mpu_init) come back as a bool; rendering them is the caller's business.
    """
    if value is None:
        return None
    try:
        if arg.kind in ("flag", "negated_flag"):
            return _to_bool(value)
        if arg.kind == "list":
            return _to_list(arg, value)
        return _checked(arg, _scalar(arg, value))
    except _Reject as err:
        raise ConfigError(f"{where}: {arg.name} = {_show(value)}: expected {err}") from None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _Reject("true or false")


def _to_list(arg: Argument, value: Any) -> list[Any]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(arg.nargs, int) and len(items) != arg.nargs:
        raise _Reject(f"a list of {arg.nargs} values")
    if arg.nargs == "+" and not items:
        raise _Reject("a list of at least one value")
    return [_checked(arg, _scalar(arg, item)) for item in items]


def _scalar(arg: Argument, value: Any) -> Any:
    if isinstance(value, (Mapping, list, tuple, set)):
        raise _Reject(f"{_TYPE_WORDS.get(arg.type or 'str', 'a value')}, not a {type(value).__name__}")
    converters = {"int": _to_int, "float": _to_float, "bool": _to_bool}
    return converters.get(arg.type or "str", _to_str)(value)


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value.strip())
    try:
        number = _to_float(value)
    except _Reject:
        raise _Reject(_TYPE_WORDS["int"]) from None
    if not number.is_integer():
        raise _Reject(_TYPE_WORDS["int"])
    return int(number)


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Reject(_TYPE_WORDS["float"])
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        raise _Reject(_TYPE_WORDS["float"]) from None
    if math.isnan(number):
        raise _Reject(_TYPE_WORDS["float"])
    return number


def _to_str(value: Any) -> str:
    if isinstance(value, bool):
        raise _Reject(_TYPE_WORDS["str"])
    return str(value)


def _checked(arg: Argument, value: Any) -> Any:
    if arg.choices is None or value in arg.choices or str(value) in map(str, arg.choices):
        return value
    raise _Reject("one of " + ", ".join(map(str, arg.choices)))


# ----------------------------------------------------------------------------- classification

# Performance knobs that matter only on CUDA and leave the trained model's math unchanged.
# fnmatch patterns over YAML keys. Deliberately absent: bf16/fp16/fp8/fp4 and every fp8_*/fp4_*
# recipe option (they change numerics), recompute_*, sequence_parallel, no_bias_gelu_fusion
# (the fused kernel is a tanh approximation of GeLU), use_te_activation_func, te_precision_config_file,
# disable_bf16_reduced_precision_matmul and kitchen quantization.
CUDA_ONLY: frozenset[str] = frozenset({
    "transformer_impl",  # TransformerEngine modules vs Megatron-Core's local ones: same layers
    "use_te",  # upstream multimodal trainers: TransformerEngine layers
    "te_rng_tracker",  # TransformerEngine's CUDA-graph-safe RNG tracker (same distributions)
    "keep_fp8_transpose_cache",  # memory knob of an fp8 run; no effect on values
    "use_flash_attn",  # flash attention kernel: exact attention
    "attention_backend",  # flash / fused / unfused / local attention kernels: same attention
    "flash_decode",  # inference decode kernel
    "no_masked_softmax_fusion",  # fused scale-mask-softmax kernel
    "no_bias_dropout_fusion",  # fused bias + dropout + residual add
    "no_bias_swiglu_fusion",  # fused bias + SwiGLU (exact SiLU)
    "no_rope_fusion",  # fused rotary embedding kernel
    "no_gradient_accumulation_fusion",  # fp32 gradient accumulation inside the weight-grad GEMM
    "no_gradient_reduce_div_fusion",  # divides gradients inside the reduction (NCCL pre-multiplied sum)
    "*persist_layer_norm",  # Apex persistent LayerNorm kernel
    "cross_entropy_loss_fusion",  # fused vocab-parallel cross entropy
    "cross_entropy_fusion_impl",  # which fused cross entropy kernel (native / TransformerEngine)
    "moe_permute_fusion",  # fused token permutation for MoE
    "moe_router_fusion",  # fused router top-k / score kernel
    "moe_grouped_gemm",  # grouped GEMM for experts instead of a loop of GEMMs
    "moe_use_legacy_grouped_gemm",  # older grouped GEMM kernel
    "use_fused_weighted_squared_relu",  # fused kernel for the same activation
    "disable_jit_fuser",  # TorchScript/nvFuser kernel fusion switch
    "*async_tensor_model_parallel_allreduce",  # async TP all-reduce on a CUDA side stream
    "*overlap*",  # communication/computation overlap (grad reduce, param gather, TP, P2P, MoE a2a)
    "*tp_comm_*",  # TransformerEngine userbuffers TP communication (bulk/split/overlap, bootstrap)
    "delay_wgrad_compute",  # reorders weight-gradient GEMMs for overlap
    "defer_embedding_wgrad_compute",  # defers embedding weight-gradient GEMMs for overlap
    "wgrad_deferral_limit",  # how many of those GEMMs may be deferred
    "no_align_grad_reduce",  # launch time of bucketed gradient reduction
    "no_align_param_gather",  # launch time of bucketed parameter all-gather
    "*cuda*",  # CUDA graphs, CUDA caching-allocator and CUDA-cache options
    "use_nccl_ub",  # NCCL user buffers
    "nccl_communicator_config_path",  # NCCL communicator tuning
    "nccl_all_reduce_for_prefill",  # NCCL all-reduce instead of a custom one in inference prefill
    "*symmetric_*",  # NCCL symmetric-memory registration and all-reduce kinds
    "use_sharp",  # SHARP in-network reductions (InfiniBand)
    "sharp_enabled_group",  # which group uses SHARP
    "high_priority_stream_groups",  # CUDA stream priorities for communicators
    "fsdp_double_buffer",  # FSDP NCCL buffer double-buffering
    "fsdp_manual_registration",  # FSDP NCCL user-buffer registration
    "moe_enable_deepep",  # DeepEP all-to-all kernels (same token routing)
    "moe_flex_dispatcher_backend",  # DeepEP / HybridEP all-to-all kernels
    "moe_*_num_sms",  # SMs given to DeepEP / HybridEP kernels
    "use_cpu_initialization",  # device placement of initialisation
    "empty_unused_memory_level",  # torch.cuda.empty_cache() calls
    "no_pin_cpu_grads",  # pinned host memory for offloaded gradients
    "no_pin_cpu_params",  # pinned host memory for offloaded parameters
    "cpu_offloading_num_layers",  # activation offloading from GPU to host memory
    "fine_grained_activation_offloading",  # activation offloading from GPU to host memory
    "offload_modules",  # which modules' activations are offloaded to host memory
    "min_offloaded_tensor_size",  # smallest activation worth offloading to host memory
})

# Options with no effect on the model or its math that a demanding user would not miss here:
# reporting to wandb/one-logger, extra TensorBoard series, timer verbosity and profilers.
INERT: frozenset[str] = frozenset({
    "*wandb*",  # Weights & Biases reporting
    "*_to_tensorboard",  # extra TensorBoard series (memory, timers, world size, validation ppl, ...)
    "tensorboard_queue_size",  # TensorBoard writer queue
    "timing_log_level",  # timer verbosity
    "timing_log_option",  # how timers are reduced across ranks in the log
    "no_barrier_with_level_1_timing",  # barrier before level-1 timers
    "profile*",  # Nsight / PyTorch profiler window and ranks
    "use_pytorch_profiler",  # PyTorch profiler instead of Nsight
    "record_memory_history",  # CUDA allocator history for memory snapshots
    "memory_snapshot_path",  # where that snapshot goes
    "*one_logger*",  # NVIDIA one-logger telemetry
    "app_tag_run_*",  # one-logger run tags
    "*straggler*",  # straggler-detector reports
    "run_workload_inspector_server",  # on-demand profiling server
    "log_num_zeros_in_grad",  # extra log column
    "log_params_norm",  # extra log column
    "log_device_memory_used",  # extra log column
    "log_energy",  # extra log column (GPU energy)
    "log_memory_interval",  # memory report interval
    "moe_per_layer_logging",  # per-layer MoE load-balancing log lines
    "config_logger_dir",  # dumps module configs for inspection
})


def _matches(name: str, patterns: frozenset[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def category(name: str, implemented: frozenset[str]) -> Category:
    """How this project treats an option: "used" when the training program implements it (`implemented`),
    else "cuda_only" (a CUDA performance knob, see CUDA_ONLY), "inert" (see INERT) or "not_implemented"."""
    key = normalize_key(name)
    if key in implemented:
        return "used"
    if _matches(key, CUDA_ONLY):
        return "cuda_only"
    if _matches(key, INERT):
        return "inert"
    return "not_implemented"
