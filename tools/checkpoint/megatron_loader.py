"""Load a Megatron-Core checkpoint written by flagscale/train into one process.

The model is built by the training program's own builder (flagscale.train.model) with
tensor/pipeline parallel size 1. From a torch_dist checkpoint, Megatron's dist_checkpointing
reshards whatever tp/pp/vpp the training used into it; a torch-format (legacy) checkpoint is read
when it was saved with tp=1 and pp=1 (its single mp_rank_00/model_optim_rng.pt holds the whole
model). The result is the full GPTModel on the CPU, with Megatron's own parameter layout (fused
QKV interleaved per query group, fused gate+up fc1).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException

from flagscale.train import checkpointing, runtime
from flagscale.train.model import build_chunks, transformer_config
from tools.checkpoint.errors import ConversionError


@dataclass(slots=True, kw_only=True)
class LoadedCheckpoint:
    """A checkpoint's model, its training arguments and where it came from."""

    model: torch.nn.Module
    args: argparse.Namespace
    """The training run's arguments (as saved in the checkpoint)."""
    path: Path
    iteration: int


def find(load_dir: str | Path, iteration: int | None = None) -> tuple[Path, int]:
    """The iteration folder to read: the latest (latest_checkpointed_iteration.txt) or `iteration`."""
    found = checkpointing.find_checkpoint(load_dir, iteration)
    if found is None:
        raise ConversionError(f"{load_dir} holds no checkpoint (no {checkpointing.TRACKER}); "
                              "pass the training's checkpoint folder (train.system.checkpoint.save)")
    return found


def torch_state(path: Path) -> dict:
    """The whole state of a torch-format checkpoint saved with tp=1 and pp=1."""
    layout = checkpointing.torch_layout(path)
    if layout != (1, 1, 1):
        raise ConversionError(
            f"{path} is a torch-format checkpoint saved with {checkpointing.describe_layout(*layout)}; the converter "
            "reads torch-format checkpoints saved with tp=1 pp=1 only (train with ckpt_format torch_dist, which "
            "reshards)"
        )
    file = checkpointing.mp_rank_dir(path, 0) / checkpointing.MODEL_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=False)  # args and RNG states: a pickle
    except checkpointing.LOAD_ERRORS as err:
        raise ConversionError(f"cannot read {file}: {type(err).__name__}: {err}") from None


def training_args(path: Path) -> argparse.Namespace:
    """The arguments the training run saved with the checkpoint."""
    try:
        is_torch = checkpointing.checkpoint_format(path) == "torch"
        common = torch_state(path) if is_torch else dist_checkpointing.load_common_state_dict(str(path))
    except (CheckpointingException, OSError, RuntimeError) as err:
        raise ConversionError(f"cannot read {path}/common.pt: {err}") from None
    if "args" not in common:
        raise ConversionError(f"{path} has no training arguments; was it written by flagscale/train?")
    return common["args"]


def global_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every model tensor in the checkpoint."""
    metadata = dist_checkpointing.load_tensors_metadata(str(path))
    return {key: tuple(t.global_shape) for key, t in metadata.items() if not key.startswith("optimizer")}


def single_process_args(args: argparse.Namespace) -> argparse.Namespace:
    """The training arguments re-laid for one CPU process (no model parallelism)."""
    local = copy.deepcopy(args)
    local.tensor_model_parallel_size = 1
    local.pipeline_model_parallel_size = 1
    local.virtual_pipeline_model_parallel_size = None
    local.num_layers_per_virtual_pipeline_stage = None
    local.context_parallel_size = 1
    local.expert_model_parallel_size = 1
    local.expert_tensor_parallel_size = 1
    local.sequence_parallel = False
    local.device = "cpu"
    local.distributed_backend = "gloo"
    return local


def _init_single_process(args: argparse.Namespace) -> None:
    """A one-rank gloo group (file rendezvous: no port) and Megatron's parallel state."""
    if not dist.is_initialized():
        store = Path(tempfile.mkdtemp(prefix="fs-convert-")) / "rendezvous"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    runtime.initialize(args)


def load(
    load_dir: str | Path, iteration: int | None = None, check: Callable[[argparse.Namespace], None] | None = None
) -> LoadedCheckpoint:
    """Build the model with the training program's builder and fill it from the checkpoint; `check`
    sees the saved training arguments first (and may refuse them) before anything is built."""
    path, step = find(load_dir, iteration)
    legacy = torch_state(path) if checkpointing.checkpoint_format(path) == "torch" else None
    saved = legacy["args"] if legacy is not None and "args" in legacy else training_args(path)
    if check is not None:
        check(saved)
    args = single_process_args(saved)
    _init_single_process(args)
    if legacy is not None:
        vocab = legacy["model"]["embedding.word_embeddings.weight"].shape[0]
    else:
        vocab = global_shapes(path)["embedding.word_embeddings.weight"][0]
    config = transformer_config(args, runtime.Runtime(device=torch.device("cpu"), rank=0, world_size=1,
                                                      tp_rank=0, pp_rank=0, dp_rank=0))
    (model,) = build_chunks(args, config, vocab)
    model.load_state_dict(legacy["model"] if legacy is not None else _dist_model_state(model, path), strict=True)
    model.eval()
    return LoadedCheckpoint(model=model, args=saved, path=path, iteration=step)


def _dist_model_state(model: torch.nn.Module, path: Path) -> dict:
    """The model's state from a torch_dist checkpoint, resharded to this one-process model."""
    request = {"model": model.sharded_state_dict(metadata=checkpointing.SHARDING_METADATA)}
    try:
        return dist_checkpointing.load(request, str(path))["model"]
    except (CheckpointingException, OSError, RuntimeError, KeyError, ValueError) as err:
        raise ConversionError(f"checkpoint {path} could not be loaded ({type(err).__name__}): {err}") from err


def shutdown() -> None:
    """Release the process group and Megatron's parallel state."""
    runtime.shutdown()
