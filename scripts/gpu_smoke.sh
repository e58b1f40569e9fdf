#!/usr/bin/env bash
# The CUDA path end to end, with one process per GPU of the machine under torchrun, so that
# NCCL, DDP, SyncBatchNorm, the queues' all_gather and the barriers run (with one GPU there
# is no process group, and the script says so). Each leg (LEGS, default all three):
#
#   frameworks  for each of FRAMEWORKS (MoBY, SynCo, BYOL): one epoch of main_pretrain.py on
#               ViT-Tiny in bf16 (O2, synthetic negatives on), then main_linear.py and
#               eval_knn.py (the k-NN bank sharded over the ranks) on its checkpoint
#   resnet      SynCo ResNet-50 in fp16 with the grad scaler (O1), its BatchNorms made
#               SyncBatchNorm, one epoch, then eval_knn.py on it
#   resume      the first of FRAMEWORKS pretrained one epoch in bf16 (O2), then resumed for a
#               second epoch in fp16 (O1): the log must say "resumed from"
#
# then a check that every checkpoint written loads. Without CUDA the same runs on the CPU as a
# dry run: 2 processes with gloo, so the collectives run, in fp32 (O0) except the resumed
# epoch (O1, fp16 autocast on the CPU). Each torchrun takes a free port.
#
#     bash scripts/gpu_smoke.sh [OUT_DIR]                 # default OUT_DIR: smoke_output
#     FRAMEWORKS="byol" LEGS="frameworks resnet" bash scripts/gpu_smoke.sh
#     NPROC=2 bash scripts/gpu_smoke.sh                   # processes (default: every GPU; 2 on the CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-smoke_output}
FRAMEWORKS=${FRAMEWORKS:-"moby synco byol"}
LEGS=${LEGS:-"frameworks resnet resume"}
PYTHON=${PYTHON:-python}
DATA="$OUT/images"
BATCH=16
for leg in $LEGS; do
    case $leg in
        frameworks | resnet | resume) ;;
        *) echo "gpu smoke: unknown leg '$leg' in LEGS; legs: frameworks resnet resume" >&2; exit 2 ;;
    esac
done

if "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    NPROC=${NPROC:-$GPUS}
    AMP=O2 RESNET_AMP=O1 FIRST_AMP=O2
    NAME=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name())")
    if [ "$NPROC" -ge 2 ]; then
        echo "gpu smoke: $NPROC processes on $GPUS x $NAME, NCCL"
    elif [ "$GPUS" -lt 2 ]; then
        echo "gpu smoke: one process on $NAME"
        echo "gpu smoke: only one GPU: no process group, NCCL is not exercised"
    else
        echo "gpu smoke: one process (NPROC=1) on $NAME: no process group, NCCL is not exercised"
    fi
else
    NPROC=${NPROC:-2}
    AMP=O0 RESNET_AMP=O0 FIRST_AMP=O0
    echo "gpu smoke: no CUDA, a dry run on the CPU ($NPROC processes, gloo, fp32)"
fi
# the queue: a multiple of the global batch, at least SynCo's 256 hardest entries
GLOBAL=$((NPROC * BATCH))
QUEUE=$(((256 + GLOBAL - 1) / GLOBAL * GLOBAL))
# 2 classes of 96 x 72 JPEGs: 2 steps per process and epoch, and 8 validation images each
PER_CLASS=$((NPROC * BATCH))

"$PYTHON" - "$DATA" "$PER_CLASS" <<'EOF'
import os
import sys

import numpy as np
from PIL import Image

rng = np.random.default_rng(0)
for split, count in (("train", int(sys.argv[2])), ("val", 8)):
    for c in range(2):
        folder = os.path.join(sys.argv[1], split, f"class_{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"))
EOF

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
launch() {
    "$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC" --master_port="$(free_port)" "$@"
}
has_leg() {
    [[ " $LEGS " == *" $1 "* ]]
}
# the queue is in the run's name (its folder), so the evaluations repeat it; they take the
# image size from the checkpoint
PRETRAIN=(MODEL.CONTRAST_NUM_NEGATIVE "$QUEUE" DATA.IMG_SIZE 64 TRAIN.WARMUP_EPOCHS 0 MODEL.SYNTHETIC_START_EPOCH 0
          PRINT_FREQ 1)

if has_leg frameworks; then
    for framework in $FRAMEWORKS; do
        common=(--cfg "configs/${framework}_vit_tiny.yaml" --data-path "$DATA" --output "$OUT" --tag smoke
                --amp-opt-level "$AMP" --batch-size "$BATCH")
        launch main_pretrain.py "${common[@]}" --opts "${PRETRAIN[@]}" TRAIN.EPOCHS 1
        launch main_linear.py "${common[@]}" --opts MODEL.CONTRAST_NUM_NEGATIVE "$QUEUE" TRAIN.EPOCHS 1 \
            TRAIN.WARMUP_EPOCHS 0 PRINT_FREQ 1
        launch eval_knn.py "${common[@]}" --opts MODEL.CONTRAST_NUM_NEGATIVE "$QUEUE"
        echo "gpu smoke: $framework pretraining, linear evaluation and k-NN done"
    done
fi

if has_leg resnet; then
    common=(--cfg configs/synco_resnet50.yaml --data-path "$DATA" --output "$OUT" --tag smoke
            --amp-opt-level "$RESNET_AMP" --batch-size "$BATCH")
    launch main_pretrain.py "${common[@]}" --opts "${PRETRAIN[@]}" TRAIN.EPOCHS 1
    launch eval_knn.py "${common[@]}" --opts MODEL.CONTRAST_NUM_NEGATIVE "$QUEUE"
    echo "gpu smoke: synco resnet50 pretraining ($RESNET_AMP) and k-NN done"
fi

if has_leg resume; then
    framework=${FRAMEWORKS%% *}
    common=(--cfg "configs/${framework}_vit_tiny.yaml" --data-path "$DATA" --output "$OUT" --tag smoke_resume
            --batch-size "$BATCH")
    launch main_pretrain.py "${common[@]}" --amp-opt-level "$FIRST_AMP" --opts "${PRETRAIN[@]}" TRAIN.EPOCHS 1
    # extended to 2 epochs: --accept-changes, which a changed schedule needs
    launch main_pretrain.py "${common[@]}" --amp-opt-level O1 --accept-changes --opts "${PRETRAIN[@]}" \
        TRAIN.EPOCHS 2 | tee "$OUT/resume.txt"
    if ! grep -qE "resumed from .+ \(epoch 0\)" "$OUT/resume.txt"; then
        echo "gpu smoke: the second run did not resume from epoch 0" >&2
        exit 1
    fi
    echo "gpu smoke: $framework pretrained in $FIRST_AMP, resumed in O1 for a second epoch"
fi

# every checkpoint written loads
"$PYTHON" - "$OUT" <<'EOF'
import glob
import os
import sys

sys.path.insert(0, os.getcwd())
from checkpoint import read_checkpoint

paths = sorted(glob.glob(os.path.join(sys.argv[1], "**", "*.pth"), recursive=True))
assert paths, "no checkpoint written"
for path in paths:
    checkpoint = read_checkpoint(path)
    print(f"gpu smoke: {path} loads (epoch {checkpoint.get('epoch')}, {len(checkpoint['model'])} tensors)")
EOF
echo "gpu smoke: all passed"
