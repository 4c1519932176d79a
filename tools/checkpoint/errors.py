"""Typed errors of the checkpoint tools."""

from flagscale.exceptions import FlagScaleError


class ConversionError(FlagScaleError):
    """A checkpoint that cannot be read or has no Hugging Face equivalent; the message names the fix."""
