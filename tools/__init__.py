"""Developer tools that live next to the flagscale package (patching, checkpoints, datasets)."""
