"""The training program torchrun starts on each rank (Megatron-Core; CUDA+nccl or CPU+gloo).

`arguments` is torch-free so the launcher can check YAML keys and parallel layouts with it.
"""
