#!/usr/bin/env bash
# FlagScale train job RUNID: srun starts this once per node
case "${SLURM_NODEID:-}" in
  0) script=<TMP>/exp/logs/RUNID/scripts/node0.sh; log=<TMP>/exp/logs/RUNID/node0.log ;;
  1) script=<TMP>/exp/logs/RUNID/scripts/node1.sh; log=<TMP>/exp/logs/RUNID/node1.log ;;
  *) echo "FlagScale: no script for SLURM_NODEID=${SLURM_NODEID:-unset}" >&2; exit 2 ;;
esac
mkdir -p "$(dirname "$log")"
exec bash "$script" > "$log" 2>&1
