"""Offline inference with vLLM: the program the inference runner starts on the host."""
