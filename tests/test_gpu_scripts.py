"""The GPU benchmark and the CUDA smoke script, as far as a machine without CUDA runs them."""

import glob
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_script


def test_gpu_benchmark_says_it_needs_cuda():
    result = run_script(["benchmarks/bench_gpu.py"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines() == [
        "bench_gpu.py: no CUDA device here; it measures GPUs only (nothing done)"
    ]


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


@pytest.mark.slow
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
