"""The serving auto-tuner (action=auto_tune on a serve config): real servers of each engine and setting in the
space, measured under the deployment's load profile, best under an SLO. See docs/auto_tuning.md, "Tuning a
server"."""
