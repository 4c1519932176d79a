#!/usr/bin/env bash
# FlagScale train job RUNID: srun starts this once per node
case "${SLURM_NODEID:-}" in
  0) script=<TMP>/exp/logs/RUNID/scripts/node0.sh; log=<TMP>/exp/logs/RUNID/node0.log ;;
  1) script=<TMP>/exp/logs/RUNID/scripts/node1.sh; log=<TMP>/exp/logs/RUNID/node1.log ;;
  *) echo "FlagScale: no script for SLURM_NODEID=${SLURM_NODEID:-unset}" >&2; exit 2 ;;
esac
mkdir -p "$(dirname "$log")"
# the node's script in a session of its own; this task ends only once everything in that session has
# (torchrun finishing its workers after a cancel): Slurm tracks this task, not orphans it would leave
setsid bash "$script" > "$log" 2>&1 &
child=$!
trap 'kill -TERM -- -"$child" 2>/dev/null' TERM INT
wait "$child"; status=$?
if kill -0 "$child" 2>/dev/null; then wait "$child"; status=$?; fi  # a signal ended the first wait
while [ -n "$(ps -o pid= -s "$child")" ]; do sleep 0.2; done
exit "$status"
