"""Interruptions and re-runs keep what was done: a restart with another schedule is refused unless
asked for, and Ctrl-C stops a run as a scheduler's SIGTERM does (the step finished, saved, exit 0)."""

import logging
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY, run_folder, run_script, small_config, wait_for

from checkpoint import resume_point, save_atomic
from config import ConfigError
from distributed import DistEnv
from engine import train_classifier_one_epoch
from lr_scheduler import build_scheduler
from optimizer import build_optimizer
from precision import GradScaler, OptimizerStep, amp_autocast
from utils import scale_learning_rates

LOGGER = logging.getLogger("test_rerun")


def run_config(folder, world_size=1, **opts):
    """The config of a run in ``folder`` with ``opts``, its learning rates scaled for ``world_size`` processes."""
    config = small_config("moby", OUTPUT=str(folder), **opts)
    scale_learning_rates(config, world_size)
    return config


def saved_run(folder, world_size=1, **opts):
    """A run folder whose checkpoint.pth (epoch 2 done) was trained with ``opts``; returns its path."""
    trained = run_config(folder, world_size, TRAIN__EPOCHS=3, **opts)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "checkpoint.pth")
    framework = {"type": trained.MODEL.TYPE, "encoder": trained.MODEL.ENCODER}
    state = {"model": {}, "epoch": 2, "framework": framework, "config": trained.dump(), "world_size": world_size}
    save_atomic(state, path)
    return path


def test_a_finished_run_started_with_another_schedule_is_refused(tmp_path):
    path = saved_run(tmp_path, TRAIN__BASE_LR=0.5)
    before = open(path, "rb").read()
    again = run_config(tmp_path, TRAIN__EPOCHS=100, TRAIN__BASE_LR=0.5)
    with pytest.raises(ConfigError) as error:
        resume_point(again, DistEnv(), LOGGER, str(tmp_path))
    assert str(error.value) == (
        f"{path} was trained with TRAIN.EPOCHS 3, but this run asks for TRAIN.EPOCHS 100: run it with its own "
        "settings (--opts TRAIN.EPOCHS 3), start another run with another --tag, or pass --accept-changes to "
        "continue it with the new ones"
    )
    assert open(path, "rb").read() == before
    # every differing key is named; the learning rates per 512 images
    other = run_config(tmp_path, TRAIN__EPOCHS=3, TRAIN__BASE_LR=0.1, DATA__BATCH_SIZE=32)
    with pytest.raises(ConfigError, match=r"trained with DATA.BATCH_SIZE \d+ TRAIN.BASE_LR 0.5, but this run asks"):
        resume_point(other, DistEnv(), LOGGER, str(tmp_path))


def test_the_same_settings_or_accepted_changes_resume(tmp_path):
    saved_run(tmp_path, world_size=2)
    # one process instead of two: the learning rates per 512 images are the same
    same = run_config(tmp_path, world_size=1, TRAIN__EPOCHS=3)
    assert resume_point(same, DistEnv(), LOGGER, str(tmp_path))[:2] == (3, 0)
    extended = run_config(tmp_path, TRAIN__EPOCHS=5, ACCEPT_CHANGES=True)
    assert resume_point(extended, DistEnv(), LOGGER, str(tmp_path))[:2] == (3, 0)


def start(args, log_path, **extra_env):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra_env)
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def pretrain_args(image_folder, output):
    return ["main_pretrain.py", "--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder,
            "--output", str(output), "--tag", "t", *TINY, "DATA.NUM_WORKERS", "1"]  # fmt: skip


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_and_the_same_command_resumes(image_folder, tmp_path):
    log = tmp_path / "interrupted.txt"
    proc = start(pretrain_args(image_folder, tmp_path), log)
    try:
        wait_for("Train: [1/2][1/4]", log, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    text = log.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    ckpt = torch.load(os.path.join(run_folder(tmp_path), "checkpoint.pth"), weights_only=False)
    assert ckpt["epoch"] == 0 and 1 < ckpt["epoch_step"] < 4  # inside epoch 1, after the step it was in
    assert f"stopped by SIGINT at epoch 1 step {ckpt['epoch_step']}: saved " in text
    resumed = run_script(pretrain_args(image_folder, tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"start training at epoch 1 step {ckpt['epoch_step']}" in resumed.stdout


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_with_one_line(image_folder, tmp_path):
    """The run hangs in its second step (a stuck file system), so the first Ctrl-C cannot be acted on."""
    log = tmp_path / "twice.txt"
    stall = {"PYTHONPATH": os.path.join(ROOT, "tests", "shims", "stall"), "RANK": "0", "STALL_RANK": "0",
             "STALL_AT": "2", "STALL_SECONDS": "600"}  # fmt: skip
    proc = start(pretrain_args(image_folder, tmp_path), log, **stall)
    try:
        wait_for("Train: [0/2][0/4]", log, proc)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # the first one waits for the step to end
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
    finally:
        proc.kill()
    text = log.read_text()
    assert "Traceback" not in text
    assert [x for x in text.splitlines() if x.startswith("error: ")] == [
        "error: rank 0 stopped at once by a second SIGINT, without saving its last steps"
    ]


@pytest.mark.parametrize("requested, expected", [(True, (3, True)), (False, (6, False))])
def test_the_classifier_epoch_stops_where_the_ranks_meet(requested, expected):
    """A stop request is acted on at the next logged step (PRINT_FREQ 2: steps 0, 2, 4 and the last)."""
    config = small_config("moby", PRINT_FREQ=2, TRAIN__WARMUP_EPOCHS=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    optimizer = build_optimizer(config, model)
    step = OptimizerStep(optimizer, model.parameters(), GradScaler("cpu", enabled=False))
    batches = [(torch.randn(2, 3, 4, 4), torch.tensor([0, 1])) for _ in range(6)]
    stop = SimpleNamespace(requested=False)
    original, updates = step.update, []

    def update_then_request():  # the request arrives during step 1
        updates.append(1)
        stop.requested = requested and len(updates) >= 2
        return original()

    step.update = update_then_request
    autocast = amp_autocast(config, torch.device("cpu"))
    scheduler = build_scheduler(config, optimizer, len(batches))
    got = train_classifier_one_epoch(config, model, batches, step, scheduler, autocast, 0, LOGGER, stop=stop)
    assert got == expected
