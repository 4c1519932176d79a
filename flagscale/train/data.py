"""Training and validation data: GPTDataset blends from Megatron-Core, read in Megatron's order.

Each rank builds the same datasets and reads the micro batches of its data-parallel slice (all TP
ranks of a slice read the same samples, so nothing has to be broadcast). Training resumes at
`consumed_samples = iteration × global batch`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from torch.utils.data import DataLoader, Dataset

from flagscale.train.arguments import parse_blend


def dataset_config(args: argparse.Namespace, tokenizer) -> GPTDatasetConfig:
    """Megatron-Core's GPTDatasetConfig from the command line (no blend = mock data)."""
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=None if args.mock_data else parse_blend(args.data_path),
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        mmap_bin_files=not args.no_mmap_bin_files,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.reset_attention_mask,  # else the causal mask is built in attention
    )


def build_datasets(args: argparse.Namespace, tokenizer) -> tuple[Dataset, Dataset | None]:
    """(train, valid) sized for the whole run; valid is None when the split leaves it empty."""
    gbs = args.global_batch_size
    sizes = [args.train_iters * gbs, args.eval_iters * gbs, 0]
    dataset_cls = MockGPTDataset if args.mock_data else GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(
        dataset_cls, sizes, lambda: True, dataset_config(args, tokenizer)
    ).build()
    return train, valid


def _slices(start: int, total: int, micro_batch: int, dp_rank: int, dp_size: int) -> Iterator[list[int]]:
    """Megatron's pretraining sampler: consecutive blocks of mbs × dp, this rank's mbs of each."""
    step = micro_batch * dp_size
    for first in range(start, total - step + 1, step):
        offset = first + dp_rank * micro_batch
        yield list(range(offset, offset + micro_batch))


def batches(
    dataset: Dataset, consumed: int, args: argparse.Namespace, dp_rank: int, dp_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Micro batches of this data-parallel rank, starting after `consumed` samples."""
    sampler = list(_slices(consumed, len(dataset), args.micro_batch_size, dp_rank, dp_size))
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    return iter(loader)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device`."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
