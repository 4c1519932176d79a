#!/usr/bin/env bash
# FlagScale train job RUNID: host node1 (node rank 0)
set -e
exit_file=/exp/aquila_cluster/logs/RUNID/node1.exit
mkdir -p /exp/aquila_cluster/logs/RUNID
container=flagscale_train
# experiment.runner.docker: everything below runs inside the container
inner='echo $$ > /tmp/flagscale-RUNID-node1.pid
cd <REPO>
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=1
export CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_IB_DISABLE=0
export NCCL_SOCKET_IFNAME=eth0
# experiment.cmds.before_start (a failure ends the script with its status)
set -e
source /opt/flagscale/.venv/bin/activate
set +e
exec <VENV_BIN>/torchrun --nnodes 2 --nproc-per-node 8 --node-rank 0 --master-addr node1 --master-port 29555 --rdzv-id RUNID --log-dir /exp/aquila_cluster/logs/RUNID/torchrun/node1 --redirects 3 --tee 3 --monitor-interval 5 <REPO>/flagscale/train/train_gpt.py --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --disable-bias-linear --use-flash-attn --use-distributed-optimizer --fp16 --initial-loss-scale 522893 --min-loss-scale 1.0 --attention-softmax-in-fp32 --accumulate-allreduce-grads-in-fp32 --log-interval 1 --tensorboard-log-interval 1 --wandb-project train-aquila-7B --wandb-exp-name train-test-7B --save-interval 1000 --num-layers 32 --hidden-size 4096 --num-attention-heads 32 --seq-length 2048 --max-position-embeddings 2048 --norm-epsilon 1e-05 --use-rotary-position-embeddings --no-position-embedding --swiglu --multiple-of 256 --normalization RMSNorm --untie-embeddings-and-output-weights --init-method-std 0.02 --attention-dropout 0.0 --hidden-dropout 0.0 --clip-grad 1.0 --train-samples 1002539063 --eval-iters 0 --micro-batch-size 2 --global-batch-size 1728 --seed 42 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --lr 2e-05 --min-lr 2e-06 --lr-warmup-samples 3076172 --lr-decay-style cosine --data-path /data/aquila/pile_wikipedia_demo --split 1 --tokenizer-type AquilaTokenizerFS --vocab-file ./examples/aquila/tokenizer/vocab.json --merge-file ./examples/aquila/tokenizer/merges.txt --special-tokens-file ./examples/aquila/tokenizer/special_tokens.txt --vocab-size 100008 --save /exp/aquila_cluster/checkpoints --load /exp/aquila_cluster/checkpoints --tensorboard-dir /exp/aquila_cluster/tensorboard --wandb-save-dir /exp/aquila_cluster/wandb --metrics-dir /exp/aquila_cluster/logs/RUNID'
trap 'docker exec "$container" bash -c '"'"'kill -TERM $(cat /tmp/flagscale-RUNID-node1.pid) 2>/dev/null'"'"'; wait "$child"' TERM INT
set +e
docker exec -i "$container" bash -c "$inner" &
child=$!
wait "$child"
status=$?
umask 077  # the job has ended: the exit file is the owner's only
echo "$status" > "$exit_file"
exit "$status"
