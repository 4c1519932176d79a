"""The auto-tuner (action=auto_tune): finds the fastest parallel strategy of a training config with
real trials run through the ordinary runner and launcher, pruned by Megatron's validity rules, a
memory model and the history of earlier trials. See docs/auto_tuning.md."""

from flagscale.auto_tuner.tuner import auto_tune

__all__ = ["auto_tune"]
