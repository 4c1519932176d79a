"""Save and resume in Megatron-LM's folder layout, in either of its two formats (`--ckpt-format`).

    <dir>/latest_checkpointed_iteration.txt    the last complete iteration ("20")
    <dir>/iter_0000020/                        torch_dist: metadata.json, common.pt, *.distcp
    <dir>/iter_0000020/mp_rank_TT[_PPP][_EEE]/ torch: model_optim_rng.pt (+ distrib_optim.pt)

torch_dist goes through Megatron-Core's `dist_checkpointing` and reshards to any tp/pp on load.
torch is Megatron-LM's legacy format: one file per tensor-parallel rank TT, pipeline stage PPP
(with pipeline parallelism) and expert-parallel rank EEE (with expert parallelism), written by
(expert-)data-parallel rank 0; the distributed optimizer's state goes to distrib_optim.pt beside
it, gathered over the data-parallel group. It resumes only with the tp/pp/ep it was saved with.

Either way the state holds the model chunks ('model' or 'model0', 'model1', ...), the optimizer,
the LR scheduler, the iteration, the arguments and the RNG states, as Megatron-LM's checkpoints
do, so either program can read the other's. A resume reads the format found on disk; the tracker
file is written only after every rank saved. Checkpoints are pickles: load only ones you trust.
"""

from __future__ import annotations

import argparse
import itertools
import pickle
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
MODEL_FILE = "model_optim_rng.pt"
DISTRIB_OPTIM_FILE = "distrib_optim.pt"
MP_RANK = re.compile(r"mp_rank_(\d{2})((?:_\d{3}){0,2})")
LOAD_ERRORS = (CheckpointException, CheckpointingException, OSError, RuntimeError, KeyError, ValueError, EOFError,
               pickle.UnpicklingError)
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


def mp_rank_dir(folder: Path, tp_rank: int, pp_rank: int | None = None, ep_rank: int | None = None) -> Path:
    """A torch-format rank folder as Megatron-LM names it: mp_rank_TT, plus _PPP with pipeline
    parallelism (pp_rank not None) and _EEE with expert parallelism (ep_rank not None)."""
    suffixes = "".join(f"_{rank:03d}" for rank in (pp_rank, ep_rank) if rank is not None)
    return folder / f"mp_rank_{tp_rank:02d}{suffixes}"


def _rank_names(folder: Path) -> dict[tuple[int, ...], Path]:
    """The mp_rank_* folders of an iteration folder by their rank numbers ((TT,), (TT, PPP), ...)."""
    found = [(MP_RANK.fullmatch(p.name), p) for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    return {(int(m[1]), *(int(r) for r in m[2].split("_")[1:])): p for m, p in found if m}


def torch_layout(folder: Path, single_suffix_is_expert: bool = False) -> tuple[int, int, int] | None:
    """(tp, pp, ep) of a torch-format iteration folder, from its mp_rank_* names; None when it has none.

    Megatron-LM's names cannot tell mp_rank_TT_PPP from mp_rank_TT_EEE: one suffix is read as the
    pipeline stage unless `single_suffix_is_expert`.
    """
    ranks = list(_rank_names(folder))
    if not ranks:
        return None
    sizes = [max(r[i] for r in ranks if len(r) > i) + 1 for i in range(max(map(len, ranks)))] + [1, 1]
    if len(ranks[0]) == 2 and single_suffix_is_expert:
        return sizes[0], 1, sizes[1]
    return sizes[0], sizes[1], sizes[2]


def describe_layout(tp: int, pp: int, ep: int) -> str:
    """'tp=2 pp=1', with ep when it is not 1."""
    return f"tp={tp} pp={pp}" + (f" ep={ep}" if ep != 1 else "")


def checkpoint_format(folder: Path) -> str:
    """The format of an iteration folder on disk: 'torch_dist', else 'torch' when it has mp_rank_* folders."""
    if (folder / "metadata.json").is_file() or not _rank_names(folder):
        return "torch_dist"
    return "torch"


def find_checkpoint(root: str | Path, step: int | None = None, ckpt_format: str = "torch_dist"
                    ) -> tuple[Path, int] | None:
    """(folder, iteration) to resume from; None when `root` holds no checkpoint (start fresh).

    `ckpt_format` only words the error for an empty iteration folder; a found one is read as it is.
    """
    root = Path(root)
    if step is not None:
        return _checked(iteration_dir(root, step), step, ckpt_format)
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
        return _checked(root / "release", 0, ckpt_format)
    if not re.fullmatch(r"\d+", text):
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number")
    return _checked(iteration_dir(root, int(text)), int(text), ckpt_format)


def _checked(path: Path, iteration: int, ckpt_format: str) -> tuple[Path, int]:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is missing (named by {TRACKER} or --ckpt-step)")
    if checkpoint_format(path) == "torch":
        _check_torch_files(path)
        return path, iteration
    if ckpt_format == "torch" and not any(path.iterdir()):
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: no mp_rank_*/{MODEL_FILE}")
    for name in ("metadata.json", "common.pt"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: no {name}")
    return path, iteration


def _check_torch_files(path: Path) -> None:
    """The mp_rank_* folders of a torch-format checkpoint form a whole grid, each with its model file."""
    names = _rank_names(path)
    if len({len(rank) for rank in names}) > 1:
        raise CheckpointError(f"checkpoint {path} mixes mp_rank_* folders of different layouts")
    sizes = [max(rank[i] for rank in names) + 1 for i in range(len(next(iter(names))))]
    for rank in itertools.product(*(range(size) for size in sizes)):
        folder = names.get(rank) or mp_rank_dir(path, *rank)
        if not (folder / MODEL_FILE).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: no {folder.name}/{MODEL_FILE}")


def _reason(err: BaseException) -> str:
    """One line: torch's CheckpointException wraps each rank's own error with its traceback."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    return f"{type(err).__name__}: {err}"


def _rng_dict() -> dict:
    """This rank's RNG states, under Megatron-LM's names."""
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _rng_state() -> ShardedObject:
    """The RNG states as a torch_dist object: one per (pp, tp) rank, saved by data-parallel rank 0;
    with expert parallelism one per (pp, tp, dp) rank, as the expert-parallel RNG differs per rank."""
    state = _rng_dict()
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    if ps.get_expert_model_parallel_world_size() > 1:
        dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
        return ShardedObject("rng_state", [state], (*shape, dp_size), (*offset, dp_rank), replica_id=0)
    return ShardedObject("rng_state", [state], shape, offset, replica_id=dp_rank)


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


def _load_parameter_state(optimizer, optim_file: Path) -> None:
    """The distributed optimizer's distrib_optim.pt, scattered from data-parallel rank 0.

    megatron-core 0.16.1 copies every per-parameter state key from the file, which has no 'step'
    (torch's Adam keeps one per parameter; Apex/TE's do not): the steps are set aside meanwhile and
    `_restore_adam_steps` rebuilds them from the param groups.
    """
    inners = [i for i in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(i, DistributedOptimizer)]
    steps = [(state, state.pop("step")) for i in inners for state in i.optimizer.state.values() if "step" in state]
    try:
        optimizer.load_parameter_state(str(optim_file))
    finally:
        for state, step in steps:
            state["step"] = step


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
    """Save a checkpoint of `iteration` under --save in --ckpt-format (all ranks take part); return its folder."""
    path = iteration_dir(args.save, iteration)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if args.ckpt_format == "torch":
        _save_torch(args, path, iteration, model, optimizer, scheduler)
    else:
        _save_dist(args, path, iteration, model, optimizer, scheduler)
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = Path(args.save) / f".{TRACKER}.tmp"
        tmp.write_text(f"{iteration}\n", encoding="utf-8")
        tmp.replace(Path(args.save) / TRACKER)
    dist.barrier()
    return path


def _save_dist(args: argparse.Namespace, path: Path, iteration: int, model: list, optimizer, scheduler) -> None:
    state = sharded_state(
        model, optimizer, scheduler, optim=not args.no_save_optim, rng=not args.no_save_rng, loading=False
    )
    state.update(iteration=iteration, checkpoint_version=CHECKPOINT_VERSION, args=args)
    dist_checkpointing.save(state, str(path), sharded_strategy=get_default_save_sharded_strategy("torch_dist"))


def running_layout() -> tuple[int, int, int]:
    """(tp, pp, ep) of this run."""
    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            max(1, ps.get_expert_model_parallel_world_size()))


def own_rank_dir(path: Path) -> Path:
    """This rank's torch-format folder in iteration folder `path`."""
    _, pp, ep = running_layout()
    return mp_rank_dir(path, ps.get_tensor_model_parallel_rank(),
                       ps.get_pipeline_model_parallel_rank() if pp > 1 else None,
                       ps.get_expert_model_parallel_rank() if ep > 1 else None)


def _save_torch(args: argparse.Namespace, path: Path, iteration: int, model: list, optimizer, scheduler) -> None:
    """Expert-data-parallel rank 0 of each tp/pp/ep rank writes model_optim_rng.pt; distrib_optim.pt is
    written by the data-parallel rank 0 of each optimizer (Megatron-LM's rule)."""
    folder, optim = own_rank_dir(path), not args.no_save_optim
    writer = ps.get_expert_data_parallel_rank() == 0
    folder.mkdir(exist_ok=True)
    if optim and args.use_distributed_optimizer:  # gathered over the data-parallel group, written by its rank 0
        optimizer.save_parameter_state(str(folder / DISTRIB_OPTIM_FILE))
    if not writer:
        return
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}
    for key, unit in zip(_model_keys(model), unwrap_model(model)):
        state[key] = unit.state_dict_for_save_checkpoint()
    if optim:
        state["optimizer"] = optimizer.state_dict()
        state["opt_param_scheduler"] = scheduler.state_dict()
    if not args.no_save_rng:
        state["rng_state"] = [_rng_dict()]
    torch.save(state, folder / MODEL_FILE)


def load(args: argparse.Namespace, model: list, optimizer, scheduler) -> tuple[int, Path | None]:
    """Resume from --load when it holds a checkpoint; (iteration to continue from, folder or None)."""
    found = find_checkpoint(args.load, args.ckpt_step, args.ckpt_format) if args.load else None
    if found is None:
        return 0, None
    path, iteration = found
    optim = not (args.no_load_optim or args.finetune)
    rng = not (args.no_load_rng or args.finetune)
    optim_file = None
    if checkpoint_format(path) == "torch":
        state = _read_torch(args, path, model, optim=optim, rng=rng)
        if optim and args.use_distributed_optimizer:
            optim_file = own_rank_dir(path) / DISTRIB_OPTIM_FILE
    else:
        state = _read_dist(path, model, optimizer, scheduler, optim=optim, rng=rng)
    for key, unit in zip(_model_keys(model), unwrap_model(model)):
        unit.load_state_dict(state[key], strict=True)
    if optim:
        _restore_optimizer(state, optimizer, scheduler, optim_file)
    elif args.fp16 or args.bf16:
        optimizer.reload_model_params()  # fp32 main weights from the loaded low-precision weights
    if rng:
        _set_rng_state(state["rng_state"])
    return (0 if args.finetune else state.get("iteration", iteration)), path


def _restore_optimizer(state: dict, optimizer, scheduler, optim_file: Path | None) -> None:
    """Optimizer and LR schedule from `state`; the distributed optimizer's torch-format state from `optim_file`."""
    with torch.no_grad():  # fp32 main params of the distributed optimizer are views of model weights
        optimizer.load_state_dict(state["optimizer"])
        if optim_file is not None:
            _load_parameter_state(optimizer, optim_file)
    _restore_adam_steps(optimizer)
    scheduler.load_state_dict(state["opt_param_scheduler"])


def _read_dist(path: Path, model: list, optimizer, scheduler, *, optim: bool, rng: bool) -> dict:
    request = sharded_state(model, optimizer, scheduler, optim=optim, rng=rng, loading=True)
    try:
        return dist_checkpointing.load(request, str(path))
    except LOAD_ERRORS as err:
        raise CheckpointError(f"checkpoint {path} could not be loaded ({_reason(err)})") from err


def _read_torch(args: argparse.Namespace, path: Path, model: list, *, optim: bool, rng: bool) -> dict:
    """This rank's model_optim_rng.pt, after checking that it fits this run."""
    running = running_layout()
    file = own_rank_dir(path) / MODEL_FILE
    if not file.is_file():  # another layout: named from the saved arguments (tensors stay on disk)
        first = sorted(_rank_names(path).values())[0] / MODEL_FILE
        _check_layout(path, _args_layout(_torch_load(first, mmap=True).get("args")) or torch_layout(path), running)
        raise CheckpointError(f"checkpoint {path} has no {file.parent.name}/{MODEL_FILE} for this rank")
    state = _torch_load(file)
    by_names = torch_layout(path, single_suffix_is_expert=running[1] == 1 and running[2] > 1)
    _check_layout(path, _args_layout(state.get("args")) or by_names, running)
    _check_torch_state(args, file, state, model, optim=optim, rng=rng)
    return state


def _torch_load(file: Path, mmap: bool = False) -> dict:
    try:
        return torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)  # args and RNG states: a pickle
    except LOAD_ERRORS as err:
        raise CheckpointError(f"checkpoint {file} could not be loaded ({_reason(err)})") from err


def _args_layout(saved: argparse.Namespace | None) -> tuple[int, int, int] | None:
    """(tp, pp, ep) the saved arguments name (they settle what Megatron-LM's folder names leave open)."""
    if saved is None:
        return None
    sizes = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")
    return tuple(getattr(saved, name, None) or 1 for name in sizes)


def _check_layout(path: Path, saved: tuple[int, ...], running: tuple[int, ...]) -> None:
    if tuple(saved) != tuple(running):
        raise CheckpointError(
            f"checkpoint {path} (ckpt_format torch) was saved with {describe_layout(*saved)} but this run has "
            f"{describe_layout(*running)}; a torch checkpoint resumes only with the layout it was saved with "
            "(ckpt_format torch_dist reshards)"
        )


def _check_torch_state(args: argparse.Namespace, file: Path, state: dict, model: list, *, optim: bool, rng: bool
                       ) -> None:
    """One line for what a torch checkpoint lacks for this run (model chunks, optimizer, RNG)."""
    chunks, saved_chunks = _model_keys(model), sorted(k for k in state if re.fullmatch(r"model\d*", k))
    if saved_chunks != sorted(chunks):
        raise CheckpointError(f"checkpoint {file} holds model chunks {saved_chunks}, this run has {chunks} "
                              "(a different virtual pipeline size)")
    if optim and "optimizer" not in state:
        raise CheckpointError(f"checkpoint {file} has no optimizer state (saved with no_save_optim); "
                              "resume with no_load_optim or finetune")
    saved_distributed = getattr(state.get("args"), "use_distributed_optimizer", args.use_distributed_optimizer)
    if optim and saved_distributed != args.use_distributed_optimizer:
        raise CheckpointError(f"checkpoint {file} was saved with use_distributed_optimizer={saved_distributed}, "
                              f"this run has {args.use_distributed_optimizer}; use the same or no_load_optim")
    if optim and args.use_distributed_optimizer and not (file.parent / DISTRIB_OPTIM_FILE).is_file():
        raise CheckpointError(f"checkpoint {file.parent} has no {DISTRIB_OPTIM_FILE} (distributed optimizer state)")
    if rng and "rng_state" not in state:
        raise CheckpointError(f"checkpoint {file} has no RNG state (saved with no_save_rng); resume with no_load_rng")
