"""What the pretraining monitors cost, as a share of a training epoch.

    python benchmarks/bench_monitor.py [--encoder vit_small] [--framework synco] [--img-size 224]
        [--batch 32] [--steps 5] [--out monitor.md]

On the device at hand (CUDA when there is one), times per image:

* ``train``: a full pretraining step (``engine.synthetic_train_step``: both views forward and
  backward, optimizer step, momentum update), the configs' default precision;
* ``online linear``: the online linear classifier's step on that step's detached features;
* ``features``: the encoder's forward in eval mode without gradients, what the online linear
  val top-1 and the k-NN bank and val features cost per image.

From these it gives the monitors' share of an ImageNet epoch (1,281,167 training images) with
the defaults (MONITOR.*): the classifier's steps, its val pass over the 50,000 val images
after every epoch, and the k-NN (a bank of KNN_TRAIN_PER_CLASS x 1,000 images and the val
images, every KNN_EVERY epochs) spread over its epochs. Decoding the images is not included:
the monitors' loaders decode one centre crop per image, a training step two views. The
k-NN's scoring (a [50,000 x bank] similarity in chunks) is timed on random unit features.
"""

import argparse
import os
import sys
import time
from argparse import Namespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_gpu import synchronize  # noqa: E402

from config import get_config  # noqa: E402
from data import DeviceAugment  # noqa: E402
from distributed import DistEnv  # noqa: E402
from engine import synthetic_train_step  # noqa: E402
from knn import knn_scores  # noqa: E402
from models import build_model  # noqa: E402
from monitor import OnlineLinear  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from precision import amp_autocast, build_optimizer_step, set_tf32  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_CLASSES = 1_281_167, 50_000, 1000


def per_call(fn, device, steps, warmup=2):
    """Seconds per call of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def measure(config, device, steps):
    """{name: seconds per image} of a training step, the online linear step and a feature extraction."""
    torch.manual_seed(0)
    batch = config.DATA.BATCH_SIZE
    model = build_model(config, steps_per_epoch=10**6).to(device)
    set_tf32(config, device)
    autocast = amp_autocast(config, device)
    optimizer_step = build_optimizer_step(config, model, build_optimizer(config, model), device)
    train_step = synthetic_train_step(config, model, DeviceAugment(gpu_aug=False), optimizer_step, autocast, device)
    times = {"train": per_call(train_step, device, steps) / batch}

    features = torch.randn(2 * batch, model.encoder.num_features, device=device)
    targets = torch.randint(0, IMAGENET_CLASSES, (batch,), device=device)
    linear = OnlineLinear(model.encoder.num_features, IMAGENET_CLASSES, 0.1, DistEnv(device=device), seed=0)
    times["online linear"] = per_call(lambda: linear.step(features, targets), device, steps) / batch

    images = torch.randn(batch, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE, device=device)
    encoder = model.encoder.eval()

    @torch.no_grad()
    def extract():
        with autocast():
            F.normalize(encoder(images).float(), dim=1)

    times["features"] = per_call(extract, device, steps) / batch
    return times


def knn_seconds(config, num_features, device):
    """Seconds of k-NN scoring of the ImageNet val images against the default bank, on random unit features."""
    bank_size = config.MONITOR.KNN_TRAIN_PER_CLASS * IMAGENET_CLASSES or IMAGENET_TRAIN
    g = torch.Generator(device=device).manual_seed(0)
    bank = F.normalize(torch.randn(bank_size, num_features, device=device, generator=g), dim=1)
    labels = torch.randint(0, IMAGENET_CLASSES, (bank_size,), device=device, generator=g)
    val = F.normalize(torch.randn(IMAGENET_VAL, num_features, device=device, generator=g), dim=1)
    val_labels = torch.randint(0, IMAGENET_CLASSES, (IMAGENET_VAL,), device=device, generator=g)
    k, temperature = config.MONITOR.KNN_K, config.MONITOR.KNN_TEMPERATURE
    synchronize(device)
    start = time.perf_counter()
    knn_scores(bank, labels, val, val_labels, [k], IMAGENET_CLASSES, temperature, gather=lambda x: x)
    synchronize(device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default="vit_small")
    parser.add_argument("--framework", default="synco", choices=["moby", "synco", "byol"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32, help="images per step (per view)")
    parser.add_argument("--steps", type=int, default=5, help="timed calls of each")
    parser.add_argument("--skip-knn-scoring", action="store_true", help="leave out the k-NN scoring's timing")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = os.path.join(ROOT, "configs", f"{args.framework}_{args.encoder}.yaml")
    opts = ["DATA.BATCH_SIZE", args.batch, "DATA.IMG_SIZE", args.img_size, "MODEL.SYNTHETIC_START_EPOCH", 0]
    config = get_config(Namespace(cfg=cfg, opts=opts))
    times = measure(config, device, args.steps)
    m = config.MONITOR
    bank = m.KNN_TRAIN_PER_CLASS * IMAGENET_CLASSES or IMAGENET_TRAIN
    num_features = build_model(config).encoder.num_features
    scoring = 0.0 if args.skip_knn_scoring else knn_seconds(config, num_features, device)
    epoch = IMAGENET_TRAIN * times["train"]
    shares = {
        "online linear steps": times["online linear"] / times["train"],
        "online linear val (50,000 images, every epoch)": IMAGENET_VAL * times["features"] / epoch,
        f"k-NN (bank {bank:,}, val 50,000, every {m.KNN_EVERY} epochs), per epoch": (
            ((bank + IMAGENET_VAL) * times["features"] + scoring) / max(m.KNN_EVERY, 1) / epoch
        ),
    }
    lines = [
        f"{args.framework} {args.encoder} {args.img_size}px, batch {args.batch}, on {device.type} "
        f"({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})",
        "",
        "| per image | ms |",
        "|---|---:|",
        *(f"| {name} | {seconds * 1e3:.3f} |" for name, seconds in times.items()),
        "",
        f"k-NN scoring of 50,000 val against {bank:,}: {scoring:.1f} s" if scoring else "k-NN scoring not timed",
        "",
        "| monitor | share of an ImageNet epoch |",
        "|---|---:|",
        *(f"| {name} | {share * 100:.2f}% |" for name, share in shares.items()),
        f"| all | {sum(shares.values()) * 100:.2f}% |",
    ]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
