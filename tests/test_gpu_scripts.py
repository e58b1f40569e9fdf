"""The GPU benchmark and the CUDA smoke script, as far as a machine without CUDA runs them."""

import glob
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_script

pytestmark = pytest.mark.slow  # the benchmark and the smoke script in other processes


def test_gpu_benchmark_says_it_needs_cuda():
    result = run_script(["benchmarks/bench_gpu.py"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines() == [
        "bench_gpu.py: no CUDA device here; it measures GPUs only (nothing done)"
    ]


@pytest.mark.slow
def test_gpu_benchmark_dry_run_has_a_row_per_precision(tmp_path):
    out = tmp_path / "gpu.md"
    result = run_script(["benchmarks/bench_gpu.py", "--dry-run", "--batch", "2", "--steps", "1", "--img-size", "32",
                         "--encoders", "vit_tiny", "--frameworks", "byol", "--loss-batches", "4", "--loader-images",
                         "8", "--out", str(out)])  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| vit_tiny | byol |")]
    assert [row[2] for row in rows] == [
        "fp32, TF32 matmuls (O0, default)",
        "full fp32 (O0, TRAIN.TF32 False)",
        "fp16 + grad scaler (O1)",
        "bf16 (O2)",
    ]
    assert all(float(row[3]) > 0 and row[6] == "n/a |" for row in rows)  # images/s; no MFU on the CPU


def test_gpu_peaks_by_part_and_mig_slices():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_gpu import peak_tflops

    peaks = {
        "NVIDIA H100 80GB HBM3": 989.0,
        "NVIDIA H100 PCIe": 756.0,
        "NVIDIA H100 NVL": 835.0,
        "NVIDIA H200": 989.0,
        "NVIDIA H200 NVL": 835.0,
        "NVIDIA A100-SXM4-80GB": 312.0,
        "NVIDIA A10G": 70.0,
        "NVIDIA A10": 125.0,
        "NVIDIA L4": None,  # not listed
    }
    assert {name: peak_tflops(name)[1] for name in peaks} == peaks
    assert peak_tflops("NVIDIA H100 80GB HBM3", 132) == ("989 TFLOP/s (H100)", 989.0)
    # a MIG slice: by its name, or by its multiprocessors
    words, peak = peak_tflops("NVIDIA A100-SXM4-40GB MIG 3g.20gb", 42)
    assert peak is None and words.startswith("unknown: a MIG slice of an A100 (42 of its 108 multiprocessors)")
    assert peak_tflops("NVIDIA H100 80GB HBM3", 16)[1] is None


def run_smoke(folder, frameworks, legs):
    """scripts/gpu_smoke.sh's dry run on the CPU (2 gloo processes) with these FRAMEWORKS and LEGS."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", FRAMEWORKS=frameworks, LEGS=legs,
               PYTHON=sys.executable)  # fmt: skip
    result = subprocess.run(
        ["bash", "scripts/gpu_smoke.sh", str(folder)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "gpu smoke: no CUDA, a dry run on the CPU (2 processes, gloo, fp32)" in lines
    assert lines[-1] == "gpu smoke: all passed"
    return result.stdout


@pytest.mark.timeout(600)  # pretraining and evaluations, each through torchrun
def test_smoke_script_dry_run_on_the_cpu(tmp_path):
    """BYOL ViT-Tiny with its evaluations, and SynCo ResNet-50, each in 2 processes."""
    stdout = run_smoke(tmp_path, "byol", "frameworks resnet")
    lines = stdout.splitlines()
    assert "gpu smoke: byol pretraining, linear evaluation and k-NN done" in lines
    assert "gpu smoke: synco resnet50 pretraining (O0) and k-NN done" in lines
    assert "k-NN bank: 32 of the 64 training features on this rank" in stdout  # 2 processes, half each
    # the pretraining checkpoints and the linear classifier's, each reported as loading
    written = glob.glob(os.path.join(tmp_path, "byol__*", "smoke", "**", "*.pth"), recursive=True)
    written += glob.glob(os.path.join(tmp_path, "synco__resnet50__*queue256*", "smoke", "*.pth"))
    assert len(written) == 5
    for path in written:
        assert f"gpu smoke: {path} loads" in stdout
        assert torch.load(path, map_location="cpu", weights_only=False)["epoch"] == 0


@pytest.mark.slow
def test_smoke_script_resumes_in_another_precision(tmp_path):
    stdout = run_smoke(tmp_path, "moby", "resume")
    assert "gpu smoke: moby pretrained in O0, resumed in O1 for a second epoch" in stdout.splitlines()
    assert "precision: AMP_OPT_LEVEL O1 (fp16 autocast with a grad scaler) on cpu" in stdout
    (last,) = glob.glob(os.path.join(tmp_path, "moby__*", "smoke_resume", "ckpt_epoch_1.pth"))
    assert f"gpu smoke: {last} loads (epoch 1," in stdout


def test_slurm_tasks_end_together():
    """Every srun of the SLURM script ends the step when a task fails (docs/faults.md)."""
    lines = open(os.path.join(ROOT, "scripts", "slurm_pretrain_linear.sh")).read().splitlines()
    sruns = [line for line in lines if line.startswith("srun ")]
    assert len(sruns) == 2 and all(line.startswith("srun --kill-on-bad-exit=1 ") for line in sruns)
