"""main_pretrain.py end to end: real processes, real gloo process groups, real images."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, free_port, run_folder, run_script

import main_pretrain
from tools.plot_log import parse_log, synthetic_epochs, synthetic_span

TORCHRUN = ["-m", "torch.distributed.run", "--nproc_per_node=2"]
LAUNCH = ["-m", "torch.distributed.launch", "--nproc_per_node=2"]
RENDEZVOUS = ["-m", "torch.distributed.run", "--nnodes=1", "--node_rank=0", "--nproc_per_node=2", "--rdzv_backend=c10d"]


def pretrain(launcher, framework, image_folder, output, port, extra=()):
    args = [*launcher, f"--master_port={port}"] if launcher else []
    if launcher == RENDEZVOUS:  # the multi-node form, with one node on localhost
        args = [*launcher, f"--rdzv_endpoint=127.0.0.1:{port}"]
    return run_script(
        [*args, "main_pretrain.py", "--cfg", f"configs/{framework}_vit_tiny.yaml", "--data-path", image_folder,
         "--output", str(output), "--tag", "t", *TINY, *extra]
    )  # fmt: skip


def check_run(output, framework, world_size, steps_per_epoch):
    folder = run_folder(output)
    name = os.path.basename(os.path.dirname(folder))
    assert name.startswith(f"{framework}__vit_tiny__")
    assert ("_queue16_" in name) == (framework != "byol")  # the name says the queue that ran
    for name in ("checkpoint.pth", "ckpt_epoch_0.pth", "ckpt_epoch_1.pth", "config.json"):
        assert os.path.isfile(os.path.join(folder, name)), name
    for rank in range(world_size):
        log = open(os.path.join(folder, f"log_rank{rank}.txt")).read()
        assert "Train: [1/2]" in log and "EPOCH 1 done" in log
        # progress: ETA of the epoch and of the run; a summary line per epoch
        assert re.search(r"Train: \[0/2\]\[0/\d+\]\teta \d+:\d\d:\d\d \(run \d+:\d\d:\d\d\)", log)
        summary = (
            r"EPOCH 0 done in \S+: mean loss [\d.]+ "
            + {
                "moby": r"contrast_acc1 [\d.]+ ",
                # synthetic negatives from epoch 0 on (MODEL.SYNTHETIC_START_EPOCH 0)
                "synco": r"contrast_acc1 [\d.]+ contrast_acc1_real [\d.]+ synthetic_above_positive [\d.]+ ",
                "byol": r"batch_acc1 [\d.]+ ",
            }[framework]
        )
        assert re.search(summary + r"linear_acc1 [\d.]+ proj_std [\d.]+ images/s [\d.]+", log)
        # TINY's 2 epochs are shorter than the configs' warm-up: rank 0 says so, once
        assert log.count("WARNING TRAIN.WARMUP_EPOCHS 5 >= TRAIN.EPOCHS 2: the learning rate never") == (rank == 0)
    # tools/plot_log.py reads SynCo's metrics, and its epochs with synthetic negatives from config.json
    parsed = parse_log(os.path.join(folder, "log_rank0.txt"))
    synco_fields = {"contrast_acc1_real", "contrast_acc5_real", "synthetic_above_positive"}
    expected = synco_fields if framework == "synco" else set()
    assert all(synco_fields & set(values) == expected for values in parsed["train"].values())
    if framework == "synco":
        assert synthetic_span(parsed, synthetic_epochs(folder)) == (0, 2)  # epochs 0 and 1, in epochs
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["MODEL"]["TYPE"] == framework and config["DATA"]["IMG_SIZE"] == 32

    ckpt = torch.load(os.path.join(folder, "checkpoint.pth"), map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1
    state = ckpt["model"]
    for prefix in ("encoder.", "encoder_k.", "projector.", "projector_k.", "predictor."):
        assert any(k.startswith(prefix) for k in state), prefix
    assert int(state["step"]) == 2 * steps_per_epoch
    if framework != "byol":
        # 2 epochs x steps x global batch keys went through a queue of 16
        assert int(state["queue_ptr"]) == (2 * steps_per_epoch * 4 * world_size) % 16
        assert torch.allclose(state["queue1"].norm(dim=0), torch.ones(16), atol=1e-5)
    # the target moved away from its initial copy of the online encoder, towards it
    assert not torch.equal(state["encoder.blocks.0.mlp.fc1.weight"], state["encoder_k.blocks.0.mlp.fc1.weight"])
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    "framework, launcher, extra",
    [
        ("moby", TORCHRUN, ["--amp-opt-level", "O1", "--accumulation-steps", "2"]),  # fp16 + grad scaler
        ("byol", TORCHRUN, ["--amp-opt-level", "O2", "--use-checkpoint"]),  # bf16 autocast
        ("synco", RENDEZVOUS, []),
    ],
)
def test_torchrun_two_processes(framework, image_folder, tmp_path, launcher, extra):
    result = pretrain(launcher, framework, image_folder, tmp_path, free_port(), extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Cosine annealing scheduler will have no effect" not in result.stdout + result.stderr  # timm's
    # 16 images, global batch 8
    check_run(tmp_path, framework, world_size=2, steps_per_epoch=2)


@pytest.mark.slow
def test_slurm_tasks(image_folder, tmp_path):
    """Two processes started as srun starts them: ranks from SLURM_* variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               SLURM_NTASKS="2", SLURM_JOB_ID="1")  # fmt: skip
    args = ["main_pretrain.py", "--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder,
            "--output", str(tmp_path), "--tag", "t", *TINY]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=dict(env, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    check_run(tmp_path, "moby", world_size=2, steps_per_epoch=2)


@pytest.mark.slow
def test_torch_distributed_launch(image_folder, tmp_path):
    result = pretrain(LAUNCH, "synco", image_folder, tmp_path, free_port())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_run(tmp_path, "synco", world_size=2, steps_per_epoch=2)


@pytest.mark.slow
def test_plain_python_single_process_and_auto_resume(image_folder, tmp_path):
    result = pretrain(None, "synco", image_folder, tmp_path, None)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = check_run(tmp_path, "synco", world_size=1, steps_per_epoch=4)
    # a second launch finds the finished run, says so and trains nothing more
    result = pretrain(None, "synco", image_folder, tmp_path, None)
    assert result.returncode == 0
    log = open(os.path.join(folder, "log_rank0.txt")).read()
    assert "run complete: all 2 epochs already trained" in log and "(epoch 1); nothing to do" in log
    assert log.count("EPOCH 1 done") == 1 and log.count("start training") == 1


@pytest.mark.slow
def test_throughput_prints_images_per_second(tmp_path):
    # GPU_AUG: the step includes the batched photometric augmentation
    result = run_script(
        ["main_pretrain.py", "--cfg", "configs/synco_vit_tiny.yaml", "--throughput", "--output", str(tmp_path),
         *TINY, "DATA.GPU_AUG", "True"]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("throughput: ") and float(last.split()[1]) > 0


def test_setup_warns_once_of_settings_that_do_nothing(tmp_path, capsys):
    """A SynCo window after the run (set by its original name) and a warm-up as long as the run."""
    argv = ["--cfg", "configs/synco_vit_tiny.yaml", "--throughput", "--output", str(tmp_path), "--opts",
            "TRAIN.EPOCHS", "20", "TRAIN.WARMUP_EPOCHS", "20", "MODEL.WARMUP_EPOCHS", "20"]  # fmt: skip
    config, env, logger = main_pretrain.setup(argv)
    assert config.MODEL.SYNTHETIC_START_EPOCH == 20
    for text in (capsys.readouterr().out, open(os.path.join(config.OUTPUT, "log_rank0.txt")).read()):
        assert text.count("WARNING TRAIN.WARMUP_EPOCHS 20 >= TRAIN.EPOCHS 20: the learning rate never leaves") == 1
        assert (
            text.count("WARNING SynCo's synthetic negatives never switch on: MODEL.SYNTHETIC_START_EPOCH 20 to ") == 1
        )
