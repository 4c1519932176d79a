#!/bin/sh
# The lightest stand-in for a per-host program (fan-out benchmark): record pid and start time, then sleep.
mkdir -p "$SLEEPER_DIR"
printf '{"pid": %s, "time": %s, "argv": []}\n' "$$" "$(date +%s.%N)" > "$SLEEPER_DIR/$$.json"
exec sleep "${SLEEPER_SECONDS:-300}"
