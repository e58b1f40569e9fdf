"""Training figures on one CUDA GPU: images/s, peak memory, FLOPs and MFU of a step.

    python benchmarks/bench_gpu.py [--out gpu.md] [--batch 128] [--steps 10]

For Swin-T and ViT-S at 224 px, batch 128, and MoBY, SynCo (synthetic negatives on, the
configs' counts) and BYOL: full training steps on synthetic uint8 batches, the step
``main_pretrain.py`` runs (normalisation on the GPU, forward of both views, backward, the
optimizer step with gradient clipping, momentum update, enqueue), with its precision built
from the config as every script builds it (precision.amp_autocast, set_tf32,
make_grad_scaler, OptimizerStep), in each precision a user can choose: O0 with TRAIN.TF32
True (the default: fp32 matmuls on TF32 tensor cores), O0 with TRAIN.TF32 False (full fp32),
O1 (fp16 autocast with the grad scaler) and O2 (bf16 autocast); then SynCo Swin-T in bf16
with TRAIN.COMPILE, and with DATA.GPU_AUG (the photometric augmentation inside the step).
Each row gives images/s, peak GPU memory, the model FLOPs of a step per image
(torch.utils.flop_counter) and the model-FLOPs utilisation against the GPU's dense bf16
peak (GPU_PEAKS; the peak used is printed, and none for a GPU not listed or a MIG slice).
Then SynCo's loss (forward + backward) next to MoBY's at B = 128 and 256, and the pretraining
DataLoader's images/s with every CPU core on generated JPEGs, to see whether the loader or
the GPU sets the pace. The tables are printed and, with --out, written as Markdown.

Without CUDA it says so in one line and exits 0; ``--dry-run`` then runs the rows on the CPU
instead (e.g. ``--dry-run --batch 2 --steps 1 --img-size 64``), to check the script;
``--encoders``, ``--frameworks`` and ``--precisions`` choose the rows.
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
from data.build import resolve_num_workers  # noqa: E402
from engine import synthetic_train_step  # noqa: E402
from models import build_model  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from precision import amp_autocast, build_optimizer_step, set_tf32  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the GPU's name (as torch.cuda.get_device_name gives it) -> (dense bf16 tensor-core peak in
# TFLOP/s, streaming multiprocessors of the whole part); the longest name found in the device's counts
GPU_PEAKS = {
    "H200 NVL": (835.0, 132),
    "H200": (989.0, 132),
    "H100 NVL": (835.0, 132),
    "H100 PCIe": (756.0, 114),
    "H100": (989.0, 132),  # SXM
    "A100": (312.0, 108),
    "L40S": (362.0, 142),
    "A10G": (70.0, 80),
    "A10": (125.0, 72),
}
# the precisions a user can choose: (AMP_OPT_LEVEL, TRAIN.TF32, as the table names it)
PRECISIONS = {
    "O0": ("O0", True, "fp32, TF32 matmuls (O0, default)"),
    "O0-fp32": ("O0", False, "full fp32 (O0, TRAIN.TF32 False)"),
    "O1": ("O1", True, "fp16 + grad scaler (O1)"),
    "O2": ("O2", True, "bf16 (O2)"),
}


def peak_tflops(name: str, multiprocessors: int | None = None) -> tuple[str, float | None]:
    """(what the MFU is measured against, as words; the dense bf16 peak in TFLOP/s, or None when
    unknown): none for a GPU not in GPU_PEAKS, nor for a MIG slice (its name says MIG, or it has
    fewer multiprocessors than the whole part), whose share of the peak is not the whole GPU's."""
    key = next((k for k in sorted(GPU_PEAKS, key=len, reverse=True) if k in name), None)
    if key is None:
        return "unknown (not in GPU_PEAKS; MFU not computed)", None
    peak, whole = GPU_PEAKS[key]
    if "MIG" in name or (multiprocessors is not None and multiprocessors < whole):
        return (
            f"unknown: a MIG slice of an {key} ({multiprocessors} of its {whole} multiprocessors), not the whole "
            f"GPU's {peak:.0f} TFLOP/s (MFU not computed)"
        ), None
    return f"{peak:.0f} TFLOP/s ({key})", peak


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def pretrain_config(framework, encoder, batch, precision="O0", compile_=False, img_size=224, gpu_aug=False):
    """The config of ``configs/<framework>_<encoder>.yaml`` in ``precision`` (a key of PRECISIONS)."""
    amp, tf32, _ = PRECISIONS[precision]
    opts = ["DATA.BATCH_SIZE", batch, "MODEL.SYNTHETIC_START_EPOCH", 0, "AMP_OPT_LEVEL", amp, "TRAIN.TF32", tf32]
    opts += ["TRAIN.COMPILE", compile_, "DATA.IMG_SIZE", img_size, "DATA.GPU_AUG", gpu_aug]
    return get_config(Namespace(cfg=os.path.join(ROOT, "configs", f"{framework}_{encoder}.yaml"), opts=opts))


def measure_training(framework, encoder, precision, batch, steps, device, compile_=False, img_size=224, gpu_aug=False):
    """(images/s, peak memory GiB (0 on the CPU), GFLOPs per image) of full training steps."""
    config = pretrain_config(framework, encoder, batch, precision, compile_, img_size, gpu_aug)
    torch.manual_seed(0)
    model = build_model(config, steps_per_epoch=10**6).to(device)
    if compile_:
        model.encoder.compile()
        model.encoder_k.compile()
    set_tf32(config, device)
    optimizer_step = build_optimizer_step(config, model, build_optimizer(config, model), device)
    augment = DeviceAugment(gpu_aug=config.DATA.GPU_AUG)
    step = synthetic_train_step(config, model, augment, optimizer_step, amp_autocast(config, device), device)

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
        config = pretrain_config(framework, "vit_tiny", batch)  # the default precision
        set_tf32(config, device)
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


def training_rows(encoders, frameworks, precisions):
    """(encoder, framework, precision, compile, GPU_AUG) of each row: every precision of every
    encoder and framework chosen, then SynCo Swin-T bf16 compiled and with DATA.GPU_AUG."""
    rows = [(e, f, p, False, False) for e in encoders for f in frameworks for p in precisions]
    if "swin_tiny" in encoders and "synco" in frameworks and "O2" in precisions:
        rows += [("swin_tiny", "synco", "O2", True, False), ("swin_tiny", "synco", "O2", False, True)]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the tables to this Markdown file")
    parser.add_argument("--batch", type=int, default=128, help="images per step (per view)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--encoders", nargs="+", default=["swin_tiny", "vit_small"], metavar="ENCODER")
    parser.add_argument("--frameworks", nargs="+", default=["moby", "synco", "byol"], choices=["moby", "synco", "byol"])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--loss-batches", type=int, nargs="+", default=[128, 256], metavar="B",
                        help="queries per view of the loss timings")  # fmt: skip
    parser.add_argument("--loader-images", type=int, default=1024)
    parser.add_argument("--dry-run", action="store_true", help="without CUDA, run every row on the CPU")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        print("bench_gpu.py: no CUDA device here; it measures GPUs only (nothing done)")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak_words, peak = peak_tflops(name, torch.cuda.get_device_properties(device).multi_processor_count)
    else:
        name, (peak_words, peak) = "CPU (dry run)", ("none on the CPU (MFU not computed)", None)
    lines = [
        f"GPU: {name}; torch {torch.__version__}; dense bf16 peak used for MFU: {peak_words}",
        "",
        "| backbone | framework | precision | images/s | peak memory (GiB) | GFLOPs/image | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for encoder, framework, precision, compile_, gpu_aug in training_rows(args.encoders, args.frameworks,
                                                                          args.precisions):  # fmt: skip
        words = PRECISIONS[precision][2] + (" + compile" if compile_ else "") + (" + GPU_AUG" if gpu_aug else "")
        try:
            rate, memory, gflops = measure_training(
                framework, encoder, precision, args.batch, args.steps, device, compile_, args.img_size, gpu_aug
            )
            mfu = f"{rate * gflops / 1e3 / peak:.1%}" if peak else "n/a"
            line = f"| {encoder} | {framework} | {words} | {rate:.1f} | {memory:.1f} | {gflops:.1f} | {mfu} |"
        except torch.cuda.OutOfMemoryError:
            line = f"| {encoder} | {framework} | {words} | out of memory | | | |"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        lines.append(line)
        print(line, flush=True)

    loss_lines = ["", "| B | MoBY loss + backward (ms) | SynCo loss + backward (ms) | ratio |", "|---|---|---|---|"]
    for batch in args.loss_batches:
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
