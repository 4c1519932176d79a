"""Runners: turn a validated config into a Plan (one per task type)."""
