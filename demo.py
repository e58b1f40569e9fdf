"""A complete SynCo run that needs no download: pretrain, then linear probe and k-NN.

    bash scripts/demo.sh        # sets up .venv, then runs this file
    python demo.py [--epochs 10] [--out demo_output]

Draws a small dataset of coloured shapes (5 classes, 64 px), pretrains SynCo
with a ViT-Tiny on it without labels, then evaluates the frozen encoder with a
linear probe and weighted k-NN, next to chance level and next to the same
evaluation of a randomly initialised encoder. A few minutes on 2 CPU cores;
uses the GPU when there is one.
"""

import argparse
import math
import os
import random
import re
import subprocess
import sys
import time

import torch
from PIL import Image, ImageDraw

from config import get_config
from engine import build_parser
from models import build_model
from tools.plot_log import plot_run

CLASSES = ("circle", "square", "triangle", "cross", "ring")
IMG_SIZE = 64


def draw_shape(shape, rng):
    """A random rendering of ``shape``: colour, size, position, rotation and background vary."""
    background = tuple(rng.randint(0, 255) for _ in range(3))
    color = tuple((c + rng.randint(80, 176)) % 256 for c in background)
    img = Image.new("RGB", (IMG_SIZE, IMG_SIZE), background)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(10, 22)
    cx, cy = rng.uniform(r, IMG_SIZE - r), rng.uniform(r, IMG_SIZE - r)
    angle = rng.uniform(0, 2 * math.pi)

    def polygon(n, radius):
        corners = [angle + 2 * math.pi * i / n for i in range(n)]
        return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in corners]

    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        draw.polygon(polygon(4, r), fill=color)
    elif shape == "triangle":
        draw.polygon(polygon(3, r), fill=color)
    elif shape == "cross":
        w = r / 3
        for a in (angle, angle + math.pi / 2):
            dx, dy, px, py = r * math.cos(a), r * math.sin(a), w * -math.sin(a), w * math.cos(a)
            draw.polygon([(cx - dx - px, cy - dy - py), (cx + dx - px, cy + dy - py),
                          (cx + dx + px, cy + dy + py), (cx - dx + px, cy - dy + py)], fill=color)  # fmt: skip
    else:  # ring
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(2, int(r / 4)))
    return img


def make_dataset(root, per_class_train=160, per_class_val=40, seed=0):
    """ImageNet-style ``root/{train,val}/<shape>/*.png``; kept if already there."""
    if os.path.isdir(os.path.join(root, "val", CLASSES[-1])):
        return root
    rng = random.Random(seed)
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for shape in CLASSES:
            folder = os.path.join(root, split, shape)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                draw_shape(shape, rng).save(os.path.join(folder, f"{i:04d}.png"))
    return root


def common_args(data, out, tag):
    return ["--cfg", "configs/synco_vit_tiny.yaml", "--data-path", data, "--output", out, "--tag", tag]


def run(script, args, result):
    """Run ``python script args`` (its output shown as it comes); returns the first group of the
    last line matching the regular expression ``result`` as a float (None for no pattern)."""
    proc = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE, text=True)
    found = None
    for line in proc.stdout:
        print(line, end="", flush=True)
        match = re.search(result, line) if result else None
        found = float(match.group(1)) if match else found
    if proc.wait():
        sys.exit(f"{script} failed (exit code {proc.returncode})")
    return found


def evaluate(data, out, tag, pretrained, epochs):
    """(linear-probe top-1, 20-NN top-1) of the encoder in ``pretrained``."""
    opts = ["DATA.IMG_SIZE", str(IMG_SIZE), "DATA.NUM_WORKERS", "2", "LINEAR_EVAL.PRETRAINED", pretrained,
            "PRINT_FREQ", "1000"]  # fmt: skip
    probe = run("main_linear.py", common_args(data, out, tag) + ["--batch-size", "64", "--lr", "2.0", "--opts",
                *opts, "TRAIN.EPOCHS", str(epochs), "TRAIN.WARMUP_EPOCHS", "1"], r"best top-1 ([0-9.]+)%")  # fmt: skip
    knn = run("eval_knn.py", common_args(data, out, tag) + ["--batch-size", "64", "--opts", *opts],
              r"20-NN \(T=[0-9.]+\): top-1 ([0-9.]+)%")  # fmt: skip
    return probe, knn


def save_random_encoder(out, tag):
    """A checkpoint holding a randomly initialised encoder, for the baseline."""
    parser = build_parser("demo.py", "", "")
    config = get_config(parser.parse_args(common_args("x", out, tag) + ["--opts", "DATA.IMG_SIZE", str(IMG_SIZE)]))
    torch.manual_seed(0)
    model = build_model(config)
    os.makedirs(config.OUTPUT, exist_ok=True)
    path = os.path.join(config.OUTPUT, "random_init.pth")
    torch.save({"model": model.state_dict(), "framework": {"type": "synco", "encoder": "vit_tiny"}, "epoch": -1}, path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="pretraining epochs")
    parser.add_argument("--probe-epochs", type=int, default=10, help="linear-probe epochs")
    parser.add_argument("--out", default="demo_output")
    args = parser.parse_args()
    start = time.time()
    data = make_dataset(os.path.join(args.out, "shapes"))
    print(f"dataset: {data} ({len(CLASSES)} classes of {IMG_SIZE} px shapes)", flush=True)

    pretrain_args = common_args(data, args.out, "demo") + [
        "--batch-size", "64", "--opts", "DATA.IMG_SIZE", str(IMG_SIZE), "DATA.NUM_WORKERS", "2",
        "TRAIN.EPOCHS", str(args.epochs), "TRAIN.WARMUP_EPOCHS", "1", "MODEL.CONTRAST_NUM_NEGATIVE", "1024",
        "MODEL.N_HARD", "64", "MODEL.PROJ_HIDDEN_DIM", "1024",
        # synthetic negatives in the second half, once the encoder tells shapes apart a little
        "MODEL.SYNTHETIC_START_EPOCH", str(args.epochs // 2), "MODEL.SYNTHETIC_END_EPOCH", str(args.epochs),
        "AUG.SSL_AUG_CROP", "0.25", "PRINT_FREQ", "5",
    ]  # fmt: skip
    for n in range(1, 7):
        pretrain_args += [f"MODEL.N{n}", "8"]
    run("main_pretrain.py", pretrain_args, None)
    run_folder = get_config(build_parser("demo.py", "", "").parse_args(pretrain_args)).OUTPUT
    pretrained = os.path.join(run_folder, "checkpoint.pth")
    curves = plot_run(run_folder)

    synco = evaluate(data, args.out, "demo", pretrained, args.probe_epochs)
    random_init = evaluate(data, args.out, "random", save_random_encoder(args.out, "random"), args.probe_epochs)
    chance = 100.0 / len(CLASSES)
    print()
    print(f"{'top-1 accuracy on val':<28}{'linear probe':>14}{'20-NN':>10}")
    print(f"{'SynCo-pretrained ViT-Tiny':<28}{synco[0]:>13.1f}%{synco[1]:>9.1f}%")
    print(f"{'randomly initialised':<28}{random_init[0]:>13.1f}%{random_init[1]:>9.1f}%")
    print(f"{'chance':<28}{chance:>13.1f}%{chance:>9.1f}%")
    print(f"\ntotal time {time.time() - start:.0f} s; outputs in {args.out}/; pretraining curves: {curves}")


if __name__ == "__main__":
    main()
