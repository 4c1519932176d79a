"""Checkpoint conversion between Megatron-Core (FlagScale training) and Hugging Face."""
