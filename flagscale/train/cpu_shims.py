"""Shims that let Megatron-Core 0.16.1 train on a CPU-only torch (gloo backend).

Megatron-Core assumes CUDA in a few hundred places. Rather than patching its files, this module
redirects the handful of entry points those places go through. It reaches into private internals,
so megatron-core is pinned (requirements/train.txt) and every shim lives here, applied once by
`install()` and only when CUDA is absent; each shim's docstring names the Megatron-Core site it covers.
Two more fix paths that break without TransformerEngine on any device (this program builds the local
layer specs): `without_transformer_engine()` (the MoE router) and `LocalMLACoreAttention` (MLA).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.tensor_parallel import random as mpu_random
from megatron.core.transformer.dot_product_attention import DotProductAttention
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


class HostEvent:
    """What `stream.record_event()` returns on the CPU: already complete (CPU work is synchronous)."""

    def synchronize(self) -> None:
        """Nothing to wait for."""

    def wait(self, stream: Any = None) -> None:
        """Nothing to wait for."""

    def query(self) -> bool:
        """Always complete."""
        return True


class HostStream:
    """A stand-in for a CUDA stream on the CPU, where every operation has finished when it returns."""

    device = _CPU

    def wait_stream(self, stream: Any) -> None:
        """Nothing to order."""

    def wait_event(self, event: Any) -> None:
        """Nothing to order."""

    def record_event(self, event: Any = None) -> HostEvent:
        """A completed event."""
        return HostEvent()

    def synchronize(self) -> None:
        """Nothing to wait for."""

    def query(self) -> bool:
        """Always idle."""
        return True


_HOST_STREAM = HostStream()


def _install_streams() -> None:
    # token_dispatcher.py (alltoall): the dispatcher copies its split sizes to the host on a side
    # stream made with torch.cuda.Stream() when the first MoE layer is built, then waits for an event
    # recorded there; both streams are this one stand-in, so the copy is plain and the wait is nothing.
    from megatron.core.transformer.moe import token_dispatcher
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    torch.cuda.current_stream = lambda device=None: _HOST_STREAM
    if MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None:
        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _HOST_STREAM
    # The same copy turns the split sizes into numpy arrays, but moe_utils.maybe_move_tensor_to_cpu
    # converts only CUDA tensors: CPU ones stayed tensors, which all_to_all_single refuses as split sizes.
    token_dispatcher.maybe_move_tensor_to_cpu = _host_tensor


def _host_tensor(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """moe_utils.maybe_move_tensor_to_cpu for tensors that are already on the CPU."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _install_sequence_parallel_norm() -> None:
    """torch_norm.py: the local spec's norm (WrappedTorchNorm, torch's LayerNorm/RMSNorm) asserts
    `not config.sequence_parallel`, a guard for what Apex's and TransformerEngine's norms do and torch's
    does not: mark the weights `sequence_parallel`. Under sequence parallelism each tensor-parallel rank
    normalizes its own slice of the sequence, so a norm weight's gradient is partial on every rank;
    finalize_model_grads (`_allreduce_non_tensor_model_parallel_grads`) sums the gradients of parameters
    so marked over the tensor-parallel group. This builds the norm with the guard passed and marks its
    parameters, which makes tp > 1 with sequence parallelism train exactly as without it.
    """
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    build = WrappedTorchNorm.__new__

    def sequence_parallel_norm(cls: type, config: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
        sequence_parallel = config.sequence_parallel
        config.sequence_parallel = False  # only for the assertion; the config is restored at once
        try:
            norm = build(cls, config, *args, **kwargs)
        finally:
            config.sequence_parallel = sequence_parallel
        if sequence_parallel:
            for param in norm.parameters():
                param.sequence_parallel = True
        return norm

    WrappedTorchNorm.__new__ = staticmethod(sequence_parallel_norm)


def without_transformer_engine() -> None:
    """Megatron-Core sites that break without TransformerEngine, on a CPU or a GPU.

    moe_utils.py binds `te_general_gemm` only when TransformerEngine imports, yet the MoE router's
    gating linear reads it unguarded (`if te_general_gemm is not None`): every MoE forward dies with
    NameError. Bind it to None (the plain torch.mm path).
    """
    from megatron.core.extensions import transformer_engine
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    if not moe_utils.HAVE_TE and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # multi_latent_attention.py sets HAVE_TE when its import of the TE layer classes succeeds, which it
    # does without TransformerEngine too (they are MagicMock placeholders there); MLA's constructor then
    # calls isinstance(linear_proj, <placeholder>) and dies with TypeError. Say what is true: no TE.
    if not transformer_engine.HAVE_TE:
        multi_latent_attention.HAVE_TE = False


class LocalMLACoreAttention(DotProductAttention):
    """The local DotProductAttention for multi-latent attention.

    multi_latent_attention.py builds its core attention with `k_channels` (query/key head size,
    qk_head_dim + qk_pos_emb_head_dim) and `v_channels` (v_head_dim), which only TransformerEngine's
    attention accepts: with the local spec, MLA dies with TypeError. The local computation already
    handles a value head size different from the query/key one except for the final reshape, which
    uses kv_channels; this sets that size from `v_channels` and the default scale from `k_channels`.
    """

    def __init__(self, *args: Any, k_channels: int | None = None, v_channels: int | None = None, **kwargs: Any):
        if kwargs.get("softmax_scale") is None and k_channels is not None:
            kwargs["softmax_scale"] = 1.0 / math.sqrt(k_channels)
        super().__init__(*args, **kwargs)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        """DotProductAttention.forward on contiguous key/value (MLA concatenates them from views)."""
        return super().forward(query, key.contiguous(), value.contiguous(), *args, **kwargs)


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
    _install_streams()
    _install_sequence_parallel_norm()
    CudaToCpuMode().__enter__()  # entered for the life of the process (never exited)
    _installed = True
