"""A complete SynCo run that needs no download: pretrain, then linear probe and k-NN.

    bash scripts/demo.sh        # sets up .venv, then runs this file
    python demo.py [--epochs 32] [--probe-epochs 10] [--out demo_output]

Draws a small dataset of shapes (5 classes: disc, ring, striped disc, dot, bar; 32 px, each
image two random grey levels, so that only the ink's layout tells the classes apart),
pretrains SynCo with a ViT-Tiny on it without labels, then evaluates the frozen encoder
with a linear probe and weighted k-NN, next to chance level and next to the same evaluation
of a randomly initialised encoder. The baseline's evaluation runs during the pretraining, on
the core it leaves idle. About 4 minutes on 2 idle CPU cores; uses the GPU when there is
one. Of the pretraining run only checkpoint.pth (its last epoch) is kept; the baseline's
weights are deleted.
"""

import argparse
import glob
import math
import os
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw

from cli import build_parser
from config import get_config
from models import build_encoder
from tools.plot_log import parse_log, plot_run

CLASSES = ("disc", "ring", "stripes", "dot", "bar")
IMG_SIZE = 32
CONFIG = "configs/synco_vit_tiny.yaml"
EPOCHS = 32  # pretraining
PROBE_EPOCHS = 10
MIN_CONTRAST = 60  # grey levels between the ink and its background
SUPERSAMPLE = 4  # drawn at 4x, then reduced: anti-aliased edges
STRIPE_PERIOD = 4  # px


def draw_shape(shape, rng):
    """A random rendering of ``shape`` in two grey levels (anti-aliased edges): brightness,
    contrast (either sign), size, position and orientation vary; nothing but the ink's layout
    tells the classes apart.

    disc: filled; ring: its outline; stripes: the disc filled with stripes; dot: a small disc;
    bar: a thick line segment."""
    while True:
        background, ink = rng.randint(0, 255), rng.randint(0, 255)
        if abs(background - ink) >= MIN_CONTRAST:
            break
    r = rng.uniform(0.3, 0.45) * IMG_SIZE  # the disc's radius; the others fit inside it
    cx, cy = rng.uniform(r, IMG_SIZE - r), rng.uniform(r, IMG_SIZE - r)
    angle = rng.uniform(0, math.pi)
    k, n = SUPERSAMPLE, IMG_SIZE * SUPERSAMPLE

    def disc(radius):  # its bounding box on the supersampled canvas
        return [(cx - radius) * k, (cy - radius) * k, (cx + radius) * k, (cy + radius) * k]

    img = Image.new("L", (n, n), background)
    draw = ImageDraw.Draw(img)
    if shape == "disc":
        draw.ellipse(disc(r), fill=ink)
    elif shape == "ring":
        draw.ellipse(disc(r), outline=ink, width=max(2, int(r / 4)) * k)
    elif shape == "stripes":
        mask = Image.new("L", (n, n), 0)
        ImageDraw.Draw(mask).ellipse(disc(r), fill=255)
        y, x = np.mgrid[0:n, 0:n].astype(np.float64)
        across = x * math.cos(angle) + y * math.sin(angle)  # [n, n], supersampled px across the stripes
        on = (across // (STRIPE_PERIOD * k / 2)) % 2 == 0
        img.paste(Image.fromarray(np.where(on, ink, background).astype(np.uint8)), (0, 0), mask)
    elif shape == "dot":
        draw.ellipse(disc(rng.uniform(0.1, 0.15) * IMG_SIZE), fill=ink)
    else:  # bar: length 1.8 r, width 0.24 of the image
        half_len, half_width = 0.9 * r, 0.12 * IMG_SIZE
        dx, dy = half_len * math.cos(angle), half_len * math.sin(angle)
        px, py = -half_width * math.sin(angle), half_width * math.cos(angle)
        corners = [(cx - dx - px, cy - dy - py), (cx + dx - px, cy + dy - py),
                   (cx + dx + px, cy + dy + py), (cx - dx + px, cy - dy + py)]  # fmt: skip
        draw.polygon([(u * k, v * k) for u, v in corners], fill=ink)
    return img.resize((IMG_SIZE, IMG_SIZE), Image.BILINEAR).convert("RGB")


def make_dataset(root, per_class_train=160, per_class_val=40, seed=0):
    """ImageNet-style ``root/{train,val}/<shape>/*.png``, the same files for the same arguments;
    kept if already there."""
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
    return ["--cfg", CONFIG, "--data-path", data, "--output", out, "--tag", tag]


def run(script, args, result, quiet=False):
    """Run ``python script args`` (its output shown as it comes, unless ``quiet``); returns the
    first group of the last line matching the regular expression ``result`` as a float (None
    for no pattern).

    One CPU thread per process unless OMP_NUM_THREADS says otherwise: the figures then do not
    depend on the number of cores (from 2 on: DATA.NUM_WORKERS 2), the data workers get the
    other cores, and a loaded machine slows it far less than two threads waiting for each other."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE, text=True, env=env)
    found = None
    for line in proc.stdout:
        if not quiet:
            print(line, end="", flush=True)
        match = re.search(result, line) if result else None
        found = float(match.group(1)) if match else found
    if proc.wait():
        sys.exit(f"{script} failed (exit code {proc.returncode})")
    return found


def evaluate(data, out, name, tag, pretrained, epochs, quiet=False):
    """(linear-probe top-1, 20-NN top-1) of the encoder in ``pretrained`` (whose stored config
    gives the image size), written under ``out/name/tag``. Test images are resized, not
    centre-cropped (TEST.CROP False): a crop would cut shapes near the border."""
    opts = ["DATA.NUM_WORKERS", "2", "TEST.CROP", "False", "MODEL.NAME", name,
            "LINEAR_EVAL.PRETRAINED", pretrained, "PRINT_FREQ", "1000"]  # fmt: skip
    probe = run("main_linear.py", common_args(data, out, tag) + ["--batch-size", "64", "--lr", "2.0", "--opts",
                *opts, "TRAIN.EPOCHS", str(epochs), "TRAIN.WARMUP_EPOCHS", "1"],
                r"best top-1 ([0-9.]+)%", quiet)  # fmt: skip
    knn = run("eval_knn.py", common_args(data, out, tag) + ["--batch-size", "64", "--opts", *opts],
              r"20-NN \(T=[0-9.]+\): top-1 ([0-9.]+)%", quiet)  # fmt: skip
    return probe, knn


def remove_checkpoints(folder, pattern):
    """Delete the files ``folder/pattern`` (glob); returns how many."""
    paths = glob.glob(os.path.join(glob.escape(folder), pattern))
    for path in paths:
        os.remove(path)
    return len(paths)


def save_random_encoder(folder):
    """``folder/random_init.pth``: a randomly initialised encoder (its weights and config), for the baseline."""
    config = get_config(build_parser("demo.py", "", "").parse_args(
        ["--cfg", CONFIG, "--opts", "DATA.IMG_SIZE", str(IMG_SIZE)]))  # fmt: skip
    torch.manual_seed(0)
    encoder = build_encoder(config, drop_path_rate=0.0)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "random_init.pth")
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    framework = {"type": "synco", "encoder": config.MODEL.ENCODER}
    torch.save({"model": state, "framework": framework, "epoch": -1, "config": config.dump()}, path)
    return path


def monitor_table(folder):
    """The pretraining's monitors after each epoch (from its log), as lines of a table."""
    parsed = parse_log(os.path.join(folder, "log_rank0.txt"))
    lines = [f"{'after epoch':>11}{'online linear train':>21}{'online linear val':>19}{'20-NN':>9}"]
    for epoch, means in parsed["epoch_means"].items():
        knn = f"{parsed['knn'][epoch][0]:.1f}%" if epoch in parsed["knn"] else ""
        val = f"{parsed['linear_val'][epoch][0]:.1f}%" if epoch in parsed["linear_val"] else ""
        lines.append(f"{epoch + 1:>11}{means.get('linear_acc1', math.nan):>20.1f}%{val:>19}{knn:>9}")
    return lines


def pretrain_and_evaluate(data, out, pretrain_args, folder, name, probe_epochs):
    """Pretrain (its output shown), keep only its last checkpoint, plot its curves, evaluate it;
    returns ((linear-probe top-1, 20-NN top-1), the curves' file, the monitors' table)."""
    run("main_pretrain.py", pretrain_args, None)
    # checkpoint.pth holds the last epoch; the numbered copies (epoch 0 and the last) go
    removed = remove_checkpoints(folder, "ckpt_epoch_*.pth")
    print(f"kept {folder}/checkpoint.pth, removed {removed} numbered checkpoints", flush=True)
    curves, monitors = plot_run(folder), monitor_table(folder)
    return evaluate(data, out, name, "demo", os.path.join(folder, "checkpoint.pth"), probe_epochs), curves, monitors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="pretraining epochs")
    parser.add_argument("--probe-epochs", type=int, default=PROBE_EPOCHS, help="linear-probe epochs")
    parser.add_argument("--out", default="demo_output")
    parser.add_argument("--data-only", action="store_true", help="only write the dataset (ImageNet-style folders)")
    args = parser.parse_args()
    start = time.time()
    data = make_dataset(os.path.join(args.out, f"grey_patterns_{IMG_SIZE}px"))
    print(f"dataset: {data} ({len(CLASSES)} classes of {IMG_SIZE} px grey shapes: {', '.join(CLASSES)})", flush=True)
    if args.data_only:
        return

    pretrain_args = common_args(data, args.out, "demo") + [
        "--batch-size", "64", "--opts", "DATA.IMG_SIZE", str(IMG_SIZE), "DATA.NUM_WORKERS", "2",
        "TRAIN.EPOCHS", str(args.epochs), "TRAIN.WARMUP_EPOCHS", "1", "TRAIN.BASE_LR", "0.004",
        # a short run: a target encoder that follows the online one closely, a queue shorter
        # than the 800 images (no stale copy of a query's own image among its negatives)
        "MODEL.CONTRAST_MOMENTUM", "0.9", "MODEL.CONTRAST_NUM_NEGATIVE", "256", "MODEL.PROJ_HIDDEN_DIM", "1024",
        "MODEL.ONLINE_DROP_PATH_RATE", "0.1", "MODEL.N_HARD", "64",
        # synthetic negatives in the second half, once the encoder tells shapes apart a little
        "MODEL.SYNTHETIC_START_EPOCH", str(args.epochs // 2), "MODEL.SYNTHETIC_END_EPOCH", str(args.epochs - 1),
        # crops keep at least half the image, so both views mostly show the shape
        "AUG.SSL_AUG_CROP", "0.5", "SAVE_FREQ", str(max(args.epochs, 1)), "PRINT_FREQ", "5",
        # the monitors: val images resized whole, as the evaluations below; a k-NN over all 800
        # training images every 4 epochs
        "TEST.CROP", "False", "MONITOR.KNN_EVERY", "4", "MONITOR.KNN_TRAIN_PER_CLASS", "0",
    ]  # fmt: skip
    for n in range(1, 7):
        pretrain_args += [f"MODEL.N{n}", "8"]
    config = get_config(build_parser("demo.py", "", "").parse_args(pretrain_args))
    folder, name = config.OUTPUT, config.MODEL.NAME

    # the random encoder's evaluation needs no pretraining: it runs meanwhile, on the core the
    # pretraining leaves idle (its figures are the same either way: its own processes and seeds)
    baseline = os.path.join(args.out, name, "random")
    random_init = save_random_encoder(baseline)
    print(f"evaluating a randomly initialised encoder meanwhile (logs in {baseline}/)", flush=True)
    with ThreadPoolExecutor(max_workers=1) as background:
        random_run = background.submit(evaluate, data, args.out, name, "random", random_init, args.probe_epochs, True)
        synco, curves, monitors = pretrain_and_evaluate(data, args.out, pretrain_args, folder, name, args.probe_epochs)
        random_scores = random_run.result()
    for pattern in ("random_init.pth", "linear_*/*.pth"):  # nothing big left for the baseline
        remove_checkpoints(baseline, pattern)
    chance = 100.0 / len(CLASSES)
    print("\nwhile SynCo pretrained (the monitors' top-1 on val, every epoch; the 20-NN every 4):")
    print("\n".join(monitors))
    print()
    print(f"{'top-1 accuracy on val':<28}{'linear probe':>14}{'20-NN':>10}")
    print(f"{'SynCo-pretrained ViT-Tiny':<28}{synco[0]:>13.1f}%{synco[1]:>9.1f}%")
    print(f"{'randomly initialised':<28}{random_scores[0]:>13.1f}%{random_scores[1]:>9.1f}%")
    print(f"{'chance':<28}{chance:>13.1f}%{chance:>9.1f}%")
    print(f"\ntotal time {time.time() - start:.0f} s; outputs in {args.out}/; pretraining curves: {curves}")


if __name__ == "__main__":
    main()
