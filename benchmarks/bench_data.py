"""Pretraining input pipeline: the project's two-view augmentation against the original's.

    python benchmarks/bench_data.py [--images 64] [--rounds 3] [--loader-images 256]

Generates photo-like 500 x 375 JPEGs (ImageNet's most common size), then on one thread
times, per image and including the decoding of the JPEG bytes:

* ``project``: ``data.augment.TwoViewAugment`` as pretraining runs it (BYOL views at
  224 px, photometric operations in the worker, uint8 out; normalisation happens on the
  training device);
* ``project GPU_AUG``: the same with ``DATA.GPU_AUG``, where the worker only decodes,
  crops and resizes, and the photometric half runs batched on the training device;
* ``reference``: the original recipe as its code has it (torchvision v1
  RandomResizedCrop(scale=(0.08, 1)), RandomHorizontalFlip, RandomApply(ColorJitter(0.4,
  0.4, 0.2, 0.1), p=0.8), RandomGrayscale(0.2), PIL GaussianBlur(sigma ~ U[0.1, 2]) with
  p=1.0 / 0.1, ImageOps.solarize p=0 / 0.2, ToTensor, Normalize) on ``convert('RGB')``.

The three alternate for ``--rounds`` rounds; the median per-image time is reported.
Then the full DataLoader of ``data/build.py`` runs one epoch over a generated JPEG
folder with 1 and 2 worker processes, with and without GPU_AUG. The last line is
``aug_over_reference=<reference time / project time>``.
"""

import argparse
import io
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import get_config  # noqa: E402
from data import build_loader, set_loader_epoch  # noqa: E402
from data.augment import build_ssl_transform  # noqa: E402
from data.photometric import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

WIDTH, HEIGHT = 500, 375


def photo_jpeg(rng: np.random.Generator, quality: int = 90) -> bytes:
    """A 500 x 375 JPEG with a photo's mix of smooth regions, edges and texture."""
    coarse = rng.integers(0, 256, (HEIGHT // 24 + 2, WIDTH // 24 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BICUBIC), dtype=np.float32)
    edges = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.NEAREST), dtype=np.float32)
    pixels = 0.7 * smooth + 0.3 * edges + rng.normal(0, 10, (HEIGHT, WIDTH, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_jpeg_folder(root: str, count: int, rng: np.random.Generator, classes: int = 4) -> None:
    """``root/train/class_<c>/img_<i>.jpg``: ``count`` photo-like JPEGs over ``classes`` folders."""
    for i in range(count):
        folder = os.path.join(root, "train", f"class_{i % classes}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"img_{i}.jpg"), "wb") as f:
            f.write(photo_jpeg(rng))


class OriginalGaussianBlur:
    """The original's blur: PIL's GaussianBlur, sigma ~ U[0.1, 2.0] from numpy."""

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(0.1, 2.0)))


def reference_transform(size: int = 224):
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def view(blur_p, solarize_p):
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.08, 1.0)),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.RandomApply([OriginalGaussianBlur()], p=blur_p),
                T.RandomApply([ImageOps.solarize], p=solarize_p),
                T.ToTensor(),
                normalize,
            ]
        )

    view1, view2 = view(1.0, 0.0), view(0.1, 0.2)

    def two_views(data: bytes):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return view1(img), view2(img)

    return two_views


def project_transform(gpu_aug: bool):
    config = pretrain_config(gpu_aug=gpu_aug)
    transform = build_ssl_transform(config)
    return lambda data: transform(Image.open(io.BytesIO(data)))


def pretrain_config(**data):
    config = get_config()
    config.defrost()
    config.DATA.IMG_SIZE = 224
    for key, value in data.items():
        setattr(config.DATA, key.upper(), value)
    config.freeze()
    return config


def ms_per_image(fn, jpegs) -> float:
    start = time.perf_counter()
    for data in jpegs:
        fn(data)
    return (time.perf_counter() - start) / len(jpegs) * 1e3


def loader_images_per_s(root: str, workers: int, gpu_aug: bool, batch: int) -> float:
    config = pretrain_config(data_path=root, num_workers=workers, gpu_aug=gpu_aug, batch_size=batch, pin_memory=False)
    _, loader = build_loader(config, rank=0, world_size=1)
    set_loader_epoch(loader, 0)
    iterator = iter(loader)
    next(iterator)  # workers started and warm
    start = time.perf_counter()
    count = sum(views[0].shape[0] for (views, _), _ in iterator)
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="JPEGs per timing round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loader-images", type=int, default=256, help="images of the DataLoader runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    jpegs = [photo_jpeg(rng) for _ in range(args.images)]
    print(
        f"torch {torch.__version__}, Pillow {Image.__version__}, 1 thread, {args.images} JPEGs of "
        f"{WIDTH}x{HEIGHT} (mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB), two 224 px views each"
    )

    pipelines = {
        "reference": reference_transform(),
        "project": project_transform(gpu_aug=False),
        "project GPU_AUG": project_transform(gpu_aug=True),
    }
    for fn in pipelines.values():  # warm-up
        fn(jpegs[0])
    times = {name: [] for name in pipelines}
    for _ in range(args.rounds):
        for name, fn in pipelines.items():
            times[name].append(ms_per_image(fn, jpegs))
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        rounds = ", ".join(f"{x:.2f}" for x in t)
        print(f"{name:16s} {median[name]:6.2f} ms/image  {1e3 / median[name]:6.1f} images/s per core  ({rounds})")
    print(f"worker CPU per image: GPU_AUG {median['project GPU_AUG']:.2f} ms vs {median['project']:.2f} ms "
          f"({median['project'] / median['project GPU_AUG']:.2f}x less)")  # fmt: skip

    with tempfile.TemporaryDirectory() as root:
        write_jpeg_folder(root, args.loader_images, rng)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"DataLoader of data/build.py, batch 32, {args.loader_images} images, {cores} CPU cores:")
        for gpu_aug in (False, True):
            for workers in (1, 2):
                rate = loader_images_per_s(root, workers, gpu_aug, batch=32)
                print(f"  GPU_AUG {str(gpu_aug):5s} workers {workers}: {rate:6.1f} images/s")
    print(f"aug_over_reference={median['reference'] / median['project']:.2f}")


if __name__ == "__main__":
    main()
