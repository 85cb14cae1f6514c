#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the same command on every node:
#   MASTER_ADDR=node0 NNODES=4 recipes/launch_multi_node.sh RECIPE.yaml [key=value ...]
# The rendezvous numbers the nodes (no NODE_RANK needed); global rank 0 owns the pool, logs and
# writes metrics, so run.output_dir (checkpoints) must be on a file system every node sees.
# Tested as two one-process nodes on 127.0.0.1 (tests/train/test_loop.py).
# Environment: MASTER_ADDR (rendezvous host, required), MASTER_PORT (29500), NNODES (required),
# NPROC (GPUs per node, default 8), RDZV_ID (job id, default megatron-recycle), COMMAND (train | run |
# sft | eval), MAX_RESTARTS (default 0): when a process fails, every node's processes are restarted
# (up to this many times on the failing node) and a restarted train / run / eval resumes from the
# newest complete checkpoint, as with --resume (README "Restarts after a crash"). NNODES=MIN:MAX
# lets the job go on with fewer nodes after one is lost (the resume then reshards the checkpoint
# for the smaller world); the node at MASTER_ADDR hosts the rendezvous and must stay. RDZV_CONF:
# torchrun's --rdzv-conf (e.g. join_timeout=900,last_call_timeout=30,heartbeat_timeout=60).
set -euo pipefail
RECIPE=${1:?usage: $0 RECIPE.yaml [key=value ...]}; shift
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}" "${NNODES:?set NNODES}"
export HF_HUB_OFFLINE=1
if [ "${MAX_RESTARTS:-0}" != 0 ]; then
  # With the TCP store torchrun's agent shares by default, restarted workers meet the last
  # attempt's keys and hang in init_process_group (seen here; pytorch/pytorch#135712). Rank 0
  # then hosts a fresh store each attempt.
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi
exec torchrun --nnodes "$NNODES" --nproc-per-node "${NPROC:-8}" --max-restarts "${MAX_RESTARTS:-0}" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-megatron-recycle}" \
  ${RDZV_CONF:+--rdzv-conf "$RDZV_CONF"} \
  -m megatron_recycle.cli "${COMMAND:-train}" --config "$RECIPE" "$@"
