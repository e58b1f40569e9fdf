#!/usr/bin/env bash
# The CUDA path end to end on one GPU: for MoBY, SynCo and BYOL, one epoch of
# main_pretrain.py under torchrun (NCCL, bf16 autocast, synthetic negatives on), then
# main_linear.py and eval_knn.py on its checkpoint, then a check that every checkpoint
# written loads. Without CUDA the same runs on the CPU (gloo, fp32): a dry run.
#
#     bash scripts/gpu_smoke.sh [OUT_DIR]          # default OUT_DIR: smoke_output
#     FRAMEWORKS="byol" bash scripts/gpu_smoke.sh  # fewer frameworks
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-smoke_output}
FRAMEWORKS=${FRAMEWORKS:-"moby synco byol"}
PYTHON=${PYTHON:-python}
DATA="$OUT/images"

# 2 classes of 96 x 72 JPEGs: 24 training and 8 validation images each
"$PYTHON" - "$DATA" <<'EOF'
import os
import sys

import numpy as np
from PIL import Image

rng = np.random.default_rng(0)
for split, count in (("train", 24), ("val", 8)):
    for c in range(2):
        folder = os.path.join(sys.argv[1], split, f"class_{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"))
EOF

if "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    AMP=O2
    echo "gpu smoke: $("$PYTHON" -c "import torch; print(torch.cuda.get_device_name())"), NCCL, bf16"
else
    AMP=O0
    echo "gpu smoke: no CUDA, a dry run on the CPU (gloo, fp32)"
fi
TORCHRUN=("$PYTHON" -m torch.distributed.run --nproc_per_node=1 --master_port=29561)
for framework in $FRAMEWORKS; do
    common=(--cfg "configs/${framework}_vit_tiny.yaml" --data-path "$DATA" --output "$OUT" --tag smoke
            --amp-opt-level "$AMP" --batch-size 16)
    # the queue is in the run's name (its folder), so the evaluations repeat it; they take the
    # image size from the checkpoint
    "${TORCHRUN[@]}" main_pretrain.py "${common[@]}" --opts MODEL.CONTRAST_NUM_NEGATIVE 256 DATA.IMG_SIZE 64 \
        TRAIN.EPOCHS 1 TRAIN.WARMUP_EPOCHS 0 MODEL.SYNTHETIC_START_EPOCH 0 PRINT_FREQ 1
    "${TORCHRUN[@]}" main_linear.py "${common[@]}" --opts MODEL.CONTRAST_NUM_NEGATIVE 256 TRAIN.EPOCHS 1 \
        TRAIN.WARMUP_EPOCHS 0 PRINT_FREQ 1
    "${TORCHRUN[@]}" eval_knn.py "${common[@]}" --opts MODEL.CONTRAST_NUM_NEGATIVE 256
    echo "gpu smoke: $framework pretraining, linear evaluation and k-NN done"
done

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
