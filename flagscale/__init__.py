"""FlagScale: run the whole life of a large model from YAML with one command."""

__version__ = "0.1.0"
