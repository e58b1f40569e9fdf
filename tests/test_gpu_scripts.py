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


@pytest.mark.timeout(600)  # pretraining, linear evaluation and k-NN, each through torchrun
def test_smoke_script_dry_run_on_the_cpu(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", FRAMEWORKS="byol", PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", "scripts/gpu_smoke.sh", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "gpu smoke: no CUDA, a dry run on the CPU (gloo, fp32)" in lines
    assert "gpu smoke: byol pretraining, linear evaluation and k-NN done" in lines
    assert lines[-1] == "gpu smoke: all passed"
    # the pretraining checkpoints and the linear classifier's, each reported as loading
    written = glob.glob(os.path.join(tmp_path, "byol__*", "smoke", "**", "*.pth"), recursive=True)
    assert len(written) == 3
    for path in written:
        assert f"gpu smoke: {path} loads" in result.stdout
        assert torch.load(path, map_location="cpu", weights_only=False)["epoch"] == 0
