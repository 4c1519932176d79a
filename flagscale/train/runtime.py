"""Where the training program runs: device, process groups, Megatron parallel state and seeds.

CUDA + nccl when a GPU is present, CPU + gloo (with `cpu_shims`) otherwise; torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) drives the process group.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from flagscale.exceptions import ConfigError
from flagscale.train import arguments, cpu_shims


@dataclass(frozen=True, slots=True, kw_only=True)
class Runtime:
    """This rank's place in the job."""

    device: torch.device
    """Where parameters and activations live."""
    rank: int
    """Global rank."""
    world_size: int
    """All ranks."""
    tp_rank: int
    """Rank in the tensor-parallel group."""
    pp_rank: int
    """Pipeline stage."""
    dp_rank: int
    """Rank in the data-parallel group (which slice of each global batch this rank reads)."""

    @property
    def is_cuda(self) -> bool:
        """True on GPUs."""
        return self.device.type == "cuda"

    @property
    def holds_loss(self) -> bool:
        """The one rank that reports: last pipeline stage, TP rank 0, DP rank 0."""
        return ps.is_pipeline_last_stage(ignore_virtual=True) and self.tp_rank == 0 and self.dp_rank == 0


def select_device(args: argparse.Namespace) -> torch.device:
    """`--device`: auto = CUDA when torch sees a GPU."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but torch sees no GPU (torch.cuda.is_available() is False)")
    if args.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


# Started without torchrun: a one-process job on a fixed local port.
_SINGLE_PROCESS_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
_SINGLE_PROCESS_PORT = "29517"


def initialize(args: argparse.Namespace) -> Runtime:
    """Process group, Megatron parallel state and seeds; CPU shims when there is no GPU."""
    if "RANK" not in os.environ:
        for key, value in {**_SINGLE_PROCESS_ENV, "MASTER_PORT": _SINGLE_PROCESS_PORT}.items():
            os.environ.setdefault(key, value)
    device = select_device(args)
    cpu_shims.without_transformer_engine()
    if device.type == "cpu":
        cpu_shims.install()
        dropped = arguments.drop_cuda_only(args)
        if dropped and os.environ.get("RANK", "0") == "0":
            print(f"note: no CUDA here, so these CUDA-only options are dropped: {', '.join(dropped)}", flush=True)
    backend = args.distributed_backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes)
        )
    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
    )
    _set_seeds(args.seed)
    return Runtime(
        device=device,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def _set_seeds(seed: int) -> None:
    """Megatron-LM's scheme: a different stream per pipeline stage, TP streams via the tracker."""
    seed += 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Tear down Megatron's groups and the process group."""
    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
