"""Serving: the deployment schema, the vLLM engine adapter, and the Ray bootstrap for multi-host jobs."""
