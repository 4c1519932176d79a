"""Dataset tools: train a small tokenizer, turn text/JSONL into Megatron .bin/.idx files."""
