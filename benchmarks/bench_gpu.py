"""Training figures on one CUDA GPU: images/s, peak memory, FLOPs and MFU of a step.

    python benchmarks/bench_gpu.py [--out gpu.md] [--batch 128] [--steps 10]

For Swin-T and ViT-S at 224 px, batch 128, and MoBY, SynCo (synthetic negatives on, the
configs' counts) and BYOL: full training steps on synthetic uint8 batches (normalisation
on the GPU, forward of both views, backward, optimizer step, momentum update, enqueue)
under bf16 autocast (O2) and fp32 with TF32 matmuls (O0), and SynCo Swin-T bf16 with
TRAIN.COMPILE, and with DATA.GPU_AUG (the photometric augmentation inside the step).
Each row gives images/s, peak GPU memory, the model FLOPs of a step per image
(torch.utils.flop_counter) and the model-FLOPs utilisation against the GPU's dense bf16
peak (PEAK_BF16_TFLOPS; the peak used is printed). Then SynCo's loss (forward + backward)
next to MoBY's at B = 128 and 256, and the pretraining DataLoader's images/s with every
CPU core on generated JPEGs, to see whether the loader or the GPU sets the pace. The
tables are printed and, with --out, written as Markdown.

Without CUDA it says so in one line and exits 0; ``--dry-run`` then runs every row on the
CPU instead (e.g. ``--dry-run --batch 2 --steps 1 --img-size 64``), to check the script.
"""

import argparse
import os
import sys
import tempfile
import time
from argparse import Namespace

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_data import loader_images_per_s, write_jpeg_folder  # noqa: E402

from config import get_config  # noqa: E402
from data import DeviceAugment  # noqa: E402
from data.augment import synthetic_views  # noqa: E402
from data.build import resolve_num_workers  # noqa: E402
from models import build_model  # noqa: E402
from optimizer import build_optimizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# dense bf16 tensor-core peaks, TFLOP/s (SXM parts; PCIe H100 756)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
AMP_DTYPES = {"O0": None, "O2": torch.bfloat16}


def peak_tflops(name: str) -> tuple[str, float | None]:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return key, PEAK_BF16_TFLOPS[key]
    return "unknown", None


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def pretrain_config(framework: str, encoder: str, batch: int, amp: str, compile_: bool = False, img_size: int = 224):
    opts = ["DATA.BATCH_SIZE", batch, "MODEL.SYNTHETIC_START_EPOCH", 0, "AMP_OPT_LEVEL", amp, "TRAIN.COMPILE", compile_]
    opts += ["DATA.IMG_SIZE", img_size]
    return get_config(Namespace(cfg=os.path.join(ROOT, "configs", f"{framework}_{encoder}.yaml"), opts=opts))


def measure_training(framework, encoder, amp, batch, steps, device, compile_=False, img_size=224, gpu_aug=False):
    """(images/s, peak memory GiB (0 on the CPU), GFLOPs per image) of full training steps."""
    config = pretrain_config(framework, encoder, batch, amp, compile_, img_size)
    torch.manual_seed(0)
    model = build_model(config, steps_per_epoch=10**6).to(device)
    if compile_:
        model.encoder.compile()
        model.encoder_k.compile()
    optimizer = build_optimizer(config, model)
    augment = DeviceAugment(gpu_aug=gpu_aug)
    views = [(images.to(device), params) for images, params in synthetic_views(config)]
    model.train()

    def step():
        x1, x2 = (augment(images, params) for images, params in views)
        with torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != "O0"):
            loss = model(x1, x2)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3 if not compile_ else 5):  # warm-up (and compilation)
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return steps * batch / elapsed, memory, counter.get_total_flops() / batch / 1e9


def measure_losses(batch, device, repeats=20):
    """ms of loss forward + backward for MoBY and SynCo at ``batch`` queries per view."""
    times = {}
    for framework in ("moby", "synco"):
        config = pretrain_config(framework, "vit_tiny", batch, "O0")
        model = build_model(config, steps_per_epoch=10**6).to(device).eval()  # eval: the queue stays
        g = torch.Generator(device=device).manual_seed(0)
        dim = config.MODEL.PROJ_DIM
        online = [torch.randn(batch, dim, device=device, generator=g, requires_grad=True) for _ in range(2)]
        target = [torch.randn(batch, dim, device=device, generator=g) for _ in range(2)]
        for _ in range(3):
            model.loss((online[0], online[1]), (target[0], target[1]))["loss"].backward()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            model.loss((online[0], online[1]), (target[0], target[1]))["loss"].backward()
        synchronize(device)
        times[framework] = (time.perf_counter() - start) / repeats * 1e3
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the tables to this Markdown file")
    parser.add_argument("--batch", type=int, default=128, help="images per step (per view)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--loader-images", type=int, default=1024)
    parser.add_argument("--dry-run", action="store_true", help="without CUDA, run every row on the CPU")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        print("bench_gpu.py: no CUDA device here; it measures GPUs only (nothing done)")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # O0 rows: fp32 with TF32 matmuls
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    peak_name, peak = peak_tflops(name)
    lines = [
        f"GPU: {name}; torch {torch.__version__}; dense bf16 peak used for MFU: "
        + (f"{peak:.0f} TFLOP/s ({peak_name})" if peak else "unknown (MFU not computed)"),
        "",
        "| backbone | framework | precision | images/s | peak memory (GiB) | GFLOPs/image | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rows = [
        (e, f, amp, False, False)
        for e in ("swin_tiny", "vit_small")
        for f in ("moby", "synco", "byol")
        for amp in ("O2", "O0")
    ]
    rows += [("swin_tiny", "synco", "O2", True, False), ("swin_tiny", "synco", "O2", False, True)]
    for encoder, framework, amp, compile_, gpu_aug in rows:
        precision = {"O2": "bf16", "O0": "fp32/TF32"}[amp] + (" + compile" if compile_ else "")
        precision += " + GPU_AUG" if gpu_aug else ""
        try:
            rate, memory, gflops = measure_training(
                framework, encoder, amp, args.batch, args.steps, device, compile_, args.img_size, gpu_aug
            )
            mfu = f"{rate * gflops / 1e3 / peak:.1%}" if peak else "n/a"
            line = f"| {encoder} | {framework} | {precision} | {rate:.1f} | {memory:.1f} | {gflops:.1f} | {mfu} |"
        except torch.cuda.OutOfMemoryError:
            line = f"| {encoder} | {framework} | {precision} | out of memory | | | |"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        lines.append(line)
        print(line, flush=True)

    loss_lines = ["", "| B | MoBY loss + backward (ms) | SynCo loss + backward (ms) | ratio |", "|---|---|---|---|"]
    for batch in (128, 256):
        moby, synco = measure_losses(batch, device).values()
        loss_lines.append(f"| {batch} | {moby:.2f} | {synco:.2f} | {synco / moby:.2f} |")
    print("\n".join(loss_lines), flush=True)
    lines += loss_lines

    workers = resolve_num_workers(-1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        write_jpeg_folder(root, args.loader_images, rng, classes=8)
        loader_lines = ["", f"| DataLoader, {workers} workers, 224 px two views | images/s |", "|---|---|"]
        for gpu_aug in (False, True):
            rate = loader_images_per_s(root, workers, gpu_aug, batch=args.batch)
            loader_lines.append(f"| DATA.GPU_AUG {gpu_aug} | {rate:.0f} |")
    print("\n".join(loader_lines), flush=True)
    lines += loader_lines
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
