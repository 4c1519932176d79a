"""Watching jobs: what went wrong (`diagnosis`); the supervisor that restarts a job builds on it."""
