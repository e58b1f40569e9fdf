"""Real scans that need no download: scikit-learn's copy of the UCI handwritten digits (1,797
images of 8 x 8 pixels, 10 classes, from 43 writers), written as an ImageNet-style folder.

    pip install scikit-learn
    python tools/digits_folder.py --out data/digits [--size 32] [--val-fraction 0.2]

Writes ``<out>/train/<digit>/<n>.png`` and ``<out>/val/<digit>/<n>.png``: each class's images in
a seeded random order, the first ``val_fraction`` of them to val. Each image is the scan's 17
grey levels stretched to 0..255, dark ink on white, enlarged to ``size`` px (bicubic). Any
script reads it with ``--data-path <out>``.
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image

SPLIT_SEED = 0


def write_digits(out, size=32, val_fraction=0.2, seed=SPLIT_SEED):
    """Write the folder; returns {split: number of images}."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    images = (255 - digits.images * (255 / digits.images.max())).round().astype(np.uint8)  # [N, 8, 8]
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in np.unique(digits.target):
        members = rng.permutation(np.flatnonzero(digits.target == label))
        num_val = int(round(len(members) * val_fraction))
        for rank, index in enumerate(members):
            split = "val" if rank < num_val else "train"
            folder = os.path.join(out, split, str(label))
            os.makedirs(folder, exist_ok=True)
            image = Image.fromarray(images[index]).resize((size, size), Image.Resampling.BICUBIC)
            image.save(os.path.join(folder, f"{index:04d}.png"))
            counts[split] += 1
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write scikit-learn's handwritten digits as train/ and val/ folders.")
    parser.add_argument("--out", required=True, help="folder to write train/ and val/ into")
    parser.add_argument("--size", type=int, default=32, help="side of the written images, in px (default 32)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class in val (default 0.2)")
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1 or args.size < 8:
        parser.error("--val-fraction must lie strictly between 0 and 1, --size be at least 8")
    try:
        counts = write_digits(args.out, args.size, args.val_fraction)
    except ImportError:
        sys.exit("error: scikit-learn is not installed (it carries the digits): pip install scikit-learn")
    print(f"wrote {counts['train']} train and {counts['val']} val images of 10 digits, {args.size} px, to {args.out}")


if __name__ == "__main__":
    main()
