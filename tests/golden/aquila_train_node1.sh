#!/usr/bin/env bash
# FlagScale train job RUNID: host node1 (node rank 0)
set -e
exit_file=/exp/aquila/logs/RUNID/node1.exit
mkdir -p /exp/aquila/logs/RUNID
cd <REPO>
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=1
export CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_IB_DISABLE=0
export NCCL_SOCKET_IFNAME=eth0
# experiment.cmds.before_start (a failure ends the script with its status)
trap 'echo "$?" > "$exit_file"' ERR
source /opt/flagscale/.venv/bin/activate
trap - ERR
set +e
<VENV_BIN>/torchrun --nnodes 2 --nproc-per-node 8 --node-rank 0 --master-addr node1 --master-port 29555 --rdzv-id RUNID --log-dir /exp/aquila/logs/RUNID/torchrun/node1 --redirects 3 --tee 3 <REPO>/flagscale/train/train_gpt.py --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --use-distributed-optimizer --overlap-grad-reduce --sequence-parallel --bf16 --attention-softmax-in-fp32 --accumulate-allreduce-grads-in-fp32 --log-interval 1 --tensorboard-dir /exp/aquila/tensorboard --save /exp/aquila/checkpoints --load /exp/aquila/checkpoints --save-interval 1000 --ckpt-format torch_dist --transformer-impl transformer_engine --use-mcore-models --use-flash-attn --num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32 --seq-length 4096 --max-position-embeddings 4096 --position-embedding-type rope --rotary-base 1000000 --normalization RMSNorm --norm-epsilon 1e-05 --swiglu --untie-embeddings-and-output-weights --disable-bias-linear --attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.0165 --micro-batch-size 1 --global-batch-size 1024 --train-iters 100000 --eval-interval 2000 --eval-iters 10 --no-masked-softmax-fusion --lr 0.00015 --min-lr 1.5e-05 --lr-decay-style cosine --lr-warmup-iters 2000 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --data-path 1.0 /data/aquila/pile_wikipedia_demo --split 1 --tokenizer-type HuggingFaceTokenizer --tokenizer-model /data/aquila/tokenizer --metrics-dir /exp/aquila/logs/RUNID
status=$?
echo "$status" > "$exit_file"
exit "$status"
