"""The GPT training program torchrun starts on every rank.

    torchrun --nproc-per-node 2 flagscale/train/train_gpt.py --tensor-model-parallel-size 2 ...

Megatron-Core end to end: GPTModel (local spec), Megatron DDP, pipeline schedules, Megatron
optimizer and LR schedule, dist_checkpointing, GPTDataset blends. CUDA + nccl on GPUs; CPU +
gloo (with `cpu_shims`) elsewhere. Arguments are Megatron-LM's (see `arguments.py`), plus
`--metrics-dir` for the metrics contract in `metrics.py`. The work is in `trainer.py`; this
script stays import-light because dist_checkpointing's spawned helper re-imports it.
"""

import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # started by path: import siblings as flagscale.train.*, never as top-level
    sys.path[0] = str(Path(__file__).resolve().parents[2])

# Megatron-Core reports, on every rank, optional CUDA extensions it falls back from (the local
# spec is used on purpose), deprecations inside torch it calls, and the distributed optimizer's
# zero_grad() reading .grad of its fp32 shard views; none is actionable by the user.
QUIET_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
    r"CUDA_DEVICE_MAX_CONNECTIONS",
    r"`load_state_dict` is deprecated",
    r"Please use DTensor instead",
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
)


def main() -> int:
    """Run this rank of the job; the exit status is the run's."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    from flagscale.train.trainer import main as run

    return run(sys.argv[1:])


if __name__ == "__main__":  # dist_checkpointing starts a multiprocessing Manager: keep this guard
    sys.exit(main())
