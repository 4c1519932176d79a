#!/usr/bin/env bash
# FlagScale train job RUNID: host node0 (node rank 0)
set -e
exit_file=<TMP>/exp/logs/RUNID/node0.exit
mkdir -p <TMP>/exp/logs/RUNID
cd <REPO>
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=1
export GLOO_SOCKET_IFNAME=lo
set +e
<VENV_BIN>/torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --master-addr "${FLAGSCALE_MASTER_ADDR}" --master-port 29600 --rdzv-id RUNID --log-dir <TMP>/exp/logs/RUNID/torchrun/node0 --redirects 3 --tee 3 <REPO>/flagscale/train/train_gpt.py --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --seed 1234 --log-interval 10 --tensorboard-dir <TMP>/exp/tensorboard --save <TMP>/exp/checkpoints --load <TMP>/exp/checkpoints --save-interval 100 --ckpt-format torch_dist --num-layers 4 --hidden-size 128 --ffn-hidden-size 352 --num-attention-heads 4 --seq-length 128 --max-position-embeddings 128 --position-embedding-type rope --normalization RMSNorm --swiglu --untie-embeddings-and-output-weights --disable-bias-linear --attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.02 --micro-batch-size 4 --global-batch-size 16 --train-iters 300 --eval-interval 50 --eval-iters 4 --lr 0.003 --min-lr 0.0003 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.01 --clip-grad 1.0 --data-path 0.7 data/tiny_gpt/stories_text_document 0.3 data/tiny_gpt/facts_text_document --split 98,1,1 --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tiny_gpt/tokenizer --wandb-save-dir <TMP>/exp/wandb --metrics-dir <TMP>/exp/logs/RUNID
status=$?
umask 077  # the job has ended: the exit file is the owner's only
echo "$status" > "$exit_file"
exit "$status"
