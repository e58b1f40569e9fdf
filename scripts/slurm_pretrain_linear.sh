#!/bin/bash
# Pretraining followed by linear evaluation on SLURM, one task per GPU.
#
#   sbatch scripts/slurm_pretrain_linear.sh configs/synco_swin_tiny.yaml /path/to/imagenet output run1
#
# srun starts one process per GPU; each reads its rank from SLURM_PROCID,
# SLURM_NTASKS and SLURM_LOCALID, and meets the others at MASTER_ADDR:MASTER_PORT.
# --kill-on-bad-exit=1: a task that ends with an error ends the others at once; without it
# they would wait for it in NCCL for the whole DIST_TIMEOUT (docs/faults.md).
#SBATCH --job-name=synco
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=10
#SBATCH --time=72:00:00
#SBATCH --output=%x-%j.out
# Preemption and the time limit: 3 minutes before the end SLURM sends USR1 to this script,
# which passes it to the training processes (they finish their step, save it and exit 0)
# and puts the job back in the queue; the requeued job resumes at the next step.
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
set -euo pipefail

CFG=${1:?usage: sbatch $0 CONFIG IMAGENET_FOLDER [OUTPUT] [TAG]}
DATA=${2:?usage: sbatch $0 CONFIG IMAGENET_FOLDER [OUTPUT] [TAG]}
OUT=${3:-output}
TAG=${4:-default}
BATCH_PER_GPU=${BATCH_PER_GPU:-128}  # 8 GPUs x 128 = 1024, a divisor of the 4096-key queue

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}

requeue=0
trap 'requeue=1; kill -USR1 "$pretrain" 2>/dev/null || true' USR1  # srun passes it to every task
srun --kill-on-bad-exit=1 python main_pretrain.py --cfg "$CFG" --data-path "$DATA" --batch-size "$BATCH_PER_GPU" \
    --output "$OUT" --tag "$TAG" --opts DATA.NUM_WORKERS "$OMP_NUM_THREADS" &
pretrain=$!
while true; do  # a trap interrupts wait: wait again until srun has ended
    status=0
    wait "$pretrain" || status=$?
    kill -0 "$pretrain" 2>/dev/null || break
done
if [ "$requeue" = 1 ]; then
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
[ "$status" = 0 ] || exit "$status"
srun --kill-on-bad-exit=1 python main_linear.py --cfg "$CFG" --data-path "$DATA" \
    --output "$OUT" --tag "$TAG" --opts DATA.NUM_WORKERS "$OMP_NUM_THREADS"
