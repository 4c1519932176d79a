"""The leaf every layer shares: what a job is (Plan, ProcessSpec, ReadyCheck), what was launched (JobRecord,
LauncherSettings, job.json) and owner-only file writes. Imports nothing of FlagScale's above config/."""
