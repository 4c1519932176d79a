#!/usr/bin/env bash
#SBATCH --job-name=tiny_gpt_slurm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --no-requeue
#SBATCH --partition=debug
#SBATCH --time=00:30:00
#SBATCH --output=<TMP>/exp/logs/RUNID/slurm-%j.out
# FlagScale train job RUNID on Slurm (submit: sbatch <TMP>/exp/logs/RUNID/scripts/sbatch.sh)
set -uo pipefail
python=<PYTHON>
log_dir=<TMP>/exp/logs/RUNID
nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
first=$(head -n 1 <<< "$nodes")
# the rendezvous: the first node's address as Slurm reaches it, and a port free there
addr=$(scontrol show node "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
export FLAGSCALE_MASTER_ADDR="${addr:-$first}"
FLAGSCALE_MASTER_PORT=$("$python" -S -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'); export FLAGSCALE_MASTER_PORT
umask 077
{
  echo "FLAGSCALE_MASTER_ADDR=$FLAGSCALE_MASTER_ADDR"
  echo "FLAGSCALE_MASTER_PORT=$FLAGSCALE_MASTER_PORT"
  echo "FLAGSCALE_NODES="$nodes
} > "$log_dir/slurm-job.env"
echo "FlagScale: job $SLURM_JOB_ID on" $nodes", rendezvous $FLAGSCALE_MASTER_ADDR:$FLAGSCALE_MASTER_PORT"
srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash <TMP>/exp/logs/RUNID/scripts/slurm-node.sh
status=$?
exit "$status"
