"""Launchers: start, stop and query planned processes on their hosts."""
