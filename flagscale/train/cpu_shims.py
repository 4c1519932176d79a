"""Shims that let Megatron-Core 0.16.1 train on a CPU-only torch (gloo backend).

Megatron-Core assumes CUDA in a few hundred places. Rather than patching its files, this module
redirects the handful of entry points those places go through. It reaches into private internals,
so megatron-core is pinned (requirements/train.txt) and every shim lives here, applied once by
`install()` and only when CUDA is absent; each shim's docstring names the Megatron-Core site it covers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.tensor_parallel import random as mpu_random
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}
_installed = False


def _is_cuda(device: Any) -> bool:
    """True for 'cuda', 'cuda:N' and torch.device('cuda', N)."""
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaToCpuMode(TorchFunctionMode):
    """Runs torch calls that ask for CUDA on the CPU instead.

    A mode is off inside the calls it handles, and torch 2.13 routes `torch.autograd.backward`
    through it: backward passes must enter the autograd engine directly, as Megatron's schedules do
    with `deallocate_pipeline_outputs=True` (model.py), so that activation recompute still sees it.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU  # optimizer.py, clip_grads.py, schedules.py: device='cuda'
        if func is torch.Tensor.cuda:
            return args[0]  # language_module.py, distrib_optimizer.py: tensor.cuda() stays where it is
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(result, result)  # clip_grads/distrib_optimizer type checks
        return result


class CpuRNGStatesTracker(mpu_random.CudaRNGStatesTracker):
    """Megatron's RNG tracker, keeping its named states as CPU generator states."""

    def add(self, name: str, seed: int) -> None:
        """Track a new named state seeded with `seed` (same contract as the CUDA tracker)."""
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        """Swap the CPU generator to the named state for the duration of the block."""
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _get_cpu_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _install_rng() -> None:
    # random.py tracker `add`/`fork` call torch.cuda.get_rng_state: keep CPU generator states.
    mpu_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # activation recompute saves/restores the "cuda" RNG: use the CPU generator instead.
    mpu_random._get_cuda_rng_state = _get_cpu_rng_state
    mpu_random._set_cuda_rng_state = _set_cpu_rng_state


def install() -> None:
    """Apply every shim once; a no-op when CUDA is available or when already installed."""
    global _installed
    if _installed or torch.cuda.is_available():
        return
    # 175 sites call torch.cuda.current_device() for a device: answer with the CPU.
    torch.cuda.current_device = lambda: _CPU
    # p2p_communication.py and filesystem_async.py synchronize; nothing to wait for on CPU.
    torch.cuda.synchronize = lambda device=None: None
    _install_rng()
    CudaToCpuMode().__enter__()  # entered for the life of the process (never exited)
    _installed = True
