"""Save and resume with Megatron-Core `dist_checkpointing` in Megatron-LM's folder layout.

    <dir>/latest_checkpointed_iteration.txt    the last complete iteration ("20")
    <dir>/iter_0000020/                        a torch_dist checkpoint (metadata.json, common.pt, *.distcp)

The state holds the model chunks ('model' or 'model0', 'model1', ...), the optimizer, the LR
scheduler, the iteration, the arguments and per-rank RNG states, as Megatron-LM's checkpoints do,
so either program can read the other's. The tracker file is written only after every rank saved.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from flagscale.exceptions import FlagScaleError

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
# How the distributed optimizer's state is laid out (Megatron-LM's default for torch_dist).
SHARDING_METADATA = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


class CheckpointError(FlagScaleError):
    """A --load folder that exists but holds no usable checkpoint."""


def iteration_dir(root: str | Path, iteration: int) -> Path:
    """`<root>/iter_0000020`."""
    return Path(root) / f"iter_{iteration:07d}"


def find_checkpoint(root: str | Path, step: int | None = None) -> tuple[Path, int] | None:
    """(folder, iteration) to resume from; None when `root` holds no checkpoint (start fresh)."""
    root = Path(root)
    if step is not None:
        return _checked(iteration_dir(root, step), step)
    tracker = root / TRACKER
    if not tracker.is_file():
        stray = sorted(p.name for p in root.glob("iter_*")) if root.is_dir() else []
        if stray:
            raise CheckpointError(
                f"{root} has {stray[-1]} but no {TRACKER}; write the iteration there or pass --ckpt-step"
            )
        return None
    text = tracker.read_text(encoding="utf-8").strip()
    if text == "release":
        return _checked(root / "release", 0)
    if not re.fullmatch(r"\d+", text):
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number")
    return _checked(iteration_dir(root, int(text)), int(text))


def _checked(path: Path, iteration: int) -> tuple[Path, int]:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is missing (named by {TRACKER} or --ckpt-step)")
    for name in ("metadata.json", "common.pt"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: no {name}")
    return path, iteration


def _reason(err: BaseException) -> str:
    """One line: torch's CheckpointException wraps each rank's own error with its traceback."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    return f"{type(err).__name__}: {err}"


def _rng_state() -> ShardedObject:
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    replica = ps.get_data_parallel_rank(with_context_parallel=True)
    return ShardedObject("rng_state", [state], shape, offset, replica_id=replica)


def _set_rng_state(states: list[dict]) -> None:
    state = states[0]
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if state["cuda_rng_state"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _model_keys(model: list) -> list[str]:
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _allocate_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer zero Adam states before a load fills them in.

    With torch's Adam (no TransformerEngine/Apex), megatron-core 0.16.1's
    DistributedOptimizer.state_dict() reads 'step' from per-parameter states that a fresh
    optimizer lacks; the load then overwrites these states (and 'step') with the checkpoint's.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer) and not inner.optimizer.state and inner.init_state_fn:
            inner.init_state_fn(inner.optimizer, inner.config)
            for state in inner.optimizer.state.values():
                state.setdefault("step", torch.zeros((), dtype=torch.float32))


def _restore_adam_steps(optimizer) -> None:
    """After a load, give each parameter its own Adam 'step', taken from its param group.

    With torch's Adam, megatron-core 0.16.1's DistributedOptimizer keeps the checkpoint's step in
    the param groups, while the per-parameter states keep the placeholder step (and, when it sets
    them, one tensor shared by all, which torch would advance once per parameter per iteration).
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(inner, DistributedOptimizer):
            continue
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                state = inner.optimizer.state.get(param)
                if state is not None and "step" in state and group.get("step") is not None:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def sharded_state(model: list, optimizer, scheduler, *, optim: bool, rng: bool, loading: bool) -> dict:
    """The sharded state dict dist_checkpointing saves or fills."""
    state: dict = {}
    for key, unit in zip(_model_keys(model), unwrap_model(model)):
        state[key] = unit.sharded_state_dict(metadata=SHARDING_METADATA)
    if optim:
        if loading:
            _allocate_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=loading, metadata=SHARDING_METADATA)
        state["opt_param_scheduler"] = scheduler.state_dict()
    if rng:
        state["rng_state"] = _rng_state()
    return state


def save(args: argparse.Namespace, iteration: int, model: list, optimizer, scheduler) -> Path:
    """Save a checkpoint of `iteration` under --save (all ranks take part); return its folder."""
    path = iteration_dir(args.save, iteration)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = sharded_state(
        model, optimizer, scheduler, optim=not args.no_save_optim, rng=not args.no_save_rng, loading=False
    )
    state.update(iteration=iteration, checkpoint_version=CHECKPOINT_VERSION, args=args)
    dist_checkpointing.save(state, str(path), sharded_strategy=get_default_save_sharded_strategy("torch_dist"))
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = Path(args.save) / f".{TRACKER}.tmp"
        tmp.write_text(f"{iteration}\n", encoding="utf-8")
        tmp.replace(Path(args.save) / TRACKER)
    dist.barrier()
    return path


def load(args: argparse.Namespace, model: list, optimizer, scheduler) -> tuple[int, Path | None]:
    """Resume from --load when it holds a checkpoint; (iteration to continue from, folder or None)."""
    found = find_checkpoint(args.load, args.ckpt_step) if args.load else None
    if found is None:
        return 0, None
    path, iteration = found
    optim = not (args.no_load_optim or args.finetune)
    rng = not (args.no_load_rng or args.finetune)
    request = sharded_state(model, optimizer, scheduler, optim=optim, rng=rng, loading=True)
    try:
        state = dist_checkpointing.load(request, str(path))
    except (CheckpointException, CheckpointingException, OSError, RuntimeError, KeyError, ValueError, EOFError) as err:
        raise CheckpointError(f"checkpoint {path} could not be loaded ({_reason(err)})") from err
    for key, unit in zip(_model_keys(model), unwrap_model(model)):
        unit.load_state_dict(state[key], strict=True)
    if optim:
        with torch.no_grad():  # fp32 main params of the distributed optimizer are views of model weights
            optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer)
        scheduler.load_state_dict(state["opt_param_scheduler"])
    elif args.fp16 or args.bf16:
        optimizer.reload_model_params()  # fp32 main weights from the loaded low-precision weights
    if rng:
        _set_rng_state(state["rng_state"])
    return (0 if args.finetune else state.get("iteration", iteration)), path
