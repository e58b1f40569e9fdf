"""Real runs meeting the faults of a shared cluster: a full disk, corrupted checkpoints,
a stalled rank, a killed data loader worker, preemption."""

import contextlib
import glob
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY, free_port, run_folder, run_script, wait_for

pytestmark = pytest.mark.slow  # real training runs in other processes (torchrun, Popen), with faults injected

SHIMS = os.path.join(ROOT, "tests", "shims")


def pretrain_args(framework, image_folder, output, *opts):
    return ["main_pretrain.py", "--cfg", f"configs/{framework}_vit_tiny.yaml", "--data-path", image_folder,
            "--output", str(output), "--tag", "t", *TINY, *opts]  # fmt: skip


def error_line(stderr):
    (line,) = [x for x in stderr.splitlines() if x.startswith("error: ")]
    return line


def test_full_disk_stops_with_one_line_and_auto_resume_takes_the_last_good_file(image_folder, tmp_path):
    args = pretrain_args("moby", image_folder, tmp_path, "TRAIN.EPOCHS", "3", "SAVE_FREQ", "1")
    # the disk fills up during the 4th checkpoint file: checkpoint.pth after epoch 1
    full = run_script(args, env={"PYTHONPATH": os.path.join(SHIMS, "full_disk"), "FULL_DISK_AT": "4"})
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    folder = run_folder(tmp_path)
    latest, newest = os.path.join(folder, "checkpoint.pth"), os.path.join(folder, "ckpt_epoch_1.pth")
    assert error_line(full.stderr) == (
        f"error: could not write {latest} (No space left on device); the last good checkpoint is {newest}: "
        f"free space in {folder} (or fix it), then resume"
    )
    assert not glob.glob(os.path.join(folder, "*.tmp.*"))
    assert torch.load(latest, weights_only=False)["epoch"] == 0  # epoch 0's, untouched
    assert torch.load(newest, weights_only=False)["epoch"] == 1

    resumed = run_script(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = open(os.path.join(folder, "log_rank0.txt")).read()
    assert f"resumed from {newest} (epoch 1)" in log and "Train: [1/3]" not in log.split("resumed from")[-1]
    assert torch.load(latest, weights_only=False)["epoch"] == 2


def flip_a_tensor_byte(path, tensor):
    """Change one byte in the middle of ``tensor``'s bytes inside the checkpoint file ``path``."""
    data = bytearray(open(path, "rb").read())
    at = data.find(tensor.numpy().tobytes())
    assert at >= 0
    data[at + tensor.numel() * tensor.element_size() // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


@pytest.mark.timeout(600)  # three runs, one after the other
def test_checkpoints_with_a_flipped_byte_are_refused_or_skipped(image_folder, tmp_path):
    args = pretrain_args("moby", image_folder, tmp_path / "run")
    first = run_script(args)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = run_folder(tmp_path / "run")
    weight = "encoder.blocks.0.attn.qkv.weight"
    for name in ("checkpoint.pth", "ckpt_epoch_1.pth"):  # both hold epoch 1
        path = os.path.join(folder, name)
        flip_a_tensor_byte(path, torch.load(path, weights_only=False)["model"][weight])
        assert torch.load(path, weights_only=False)["epoch"] == 1  # torch.load alone says nothing

    # --resume of a corrupt file: one line
    refused = run_script(pretrain_args("moby", image_folder, tmp_path / "other", "--resume", path))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert error_line(refused.stderr).startswith(f"error: corrupt checkpoint {path}: its content does not match")

    # auto-resume skips both, with a warning each, for epoch 0's
    resumed = run_script([*args, "TRAIN.EPOCHS", "3", "--accept-changes"])  # extended from 2 epochs
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = open(os.path.join(folder, "log_rank0.txt")).read()
    for name in ("checkpoint.pth", "ckpt_epoch_1.pth"):
        assert f"WARNING skipping corrupt checkpoint {os.path.join(folder, name)}" in log
    assert f"resumed from {os.path.join(folder, 'ckpt_epoch_0.pth')} (epoch 0)" in log
    assert torch.load(os.path.join(folder, "checkpoint.pth"), weights_only=False)["epoch"] == 2


def start_rank(rank, args, port, extra_env, log_path):
    """One process of a 2-process group, started as torchrun starts it."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", **extra_env)  # fmt: skip
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def test_a_stalled_rank_turns_into_an_error_on_the_other_within_the_timeout(image_folder, tmp_path):
    args = pretrain_args("moby", image_folder, tmp_path, "DIST_TIMEOUT", "5")
    # rank 1 hangs for 10 minutes in its third step (epoch 1 step 0)
    stall = {"PYTHONPATH": os.path.join(SHIMS, "stall"), "STALL_RANK": "1", "STALL_AT": "3", "STALL_SECONDS": "600"}
    logs = [tmp_path / f"rank{r}.txt" for r in range(2)]
    port = free_port()  # the two ranks meet at one port
    procs = [start_rank(r, args, port, stall, logs[r]) for r in range(2)]
    try:
        assert procs[0].wait(timeout=120) == 2, logs[0].read_text()[-3000:]
        assert procs[1].poll() is None  # still asleep
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    out = logs[0].read_text()
    assert "Traceback" not in out
    line = error_line(out)
    assert (
        line.startswith("error: rank 0 at epoch 1 step ")
        and "waited more than DIST_TIMEOUT 5 s for the other processes in a collective" in line
    ), line


def test_a_killed_loader_worker_ends_the_run_with_one_line_and_the_resume_continues(image_folder, tmp_path):
    args = pretrain_args("moby", image_folder, tmp_path, "DATA.NUM_WORKERS", "2")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = tmp_path / "killed.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for("Train: [1/2][0/4]", log, proc)
        workers = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
        os.kill(int(workers[0]), signal.SIGKILL)
        assert proc.wait(timeout=60) == 2, log.read_text()[-3000:]
    finally:
        proc.kill()
    killed = log.read_text()
    assert "Traceback" not in killed
    line = error_line(killed)
    assert re.fullmatch(
        rf"error: rank 0 at epoch 1 step \d: a data loader worker died "
        rf"\(DataLoader worker \(pid(?:\(s\))? {workers[0]}\).*\): out of host memory\? Lower DATA.NUM_WORKERS",
        line,
    ), line

    resumed = run_script(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = open(os.path.join(run_folder(tmp_path), "log_rank0.txt")).read().split("resumed from")[-1]
    done_before = epoch_losses(killed, 1)
    assert done_before and epoch_losses(log, 1)[: len(done_before)] == done_before


def epoch_losses(log_text, epoch):
    """The (step, loss) pairs logged for ``epoch``, in the order logged."""
    return re.findall(rf"Train: \[{epoch}/2\]\[(\d+)/\d+\].*?\bloss (\S+)", log_text)


def start_torchrun(args, port, log_path, *launcher_opts, extra_env=None):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(extra_env or {}))
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *launcher_opts]
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, *launcher, *args], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


@pytest.mark.timeout(600)  # three torchrun runs, one after the other
def test_preempted_mid_epoch_run_resumes_exactly(image_folder, tmp_path):
    # 2 processes x batch 2: 4 steps per epoch
    def args(output, *opts):
        return [*pretrain_args("synco", image_folder, output, *opts), "--batch-size", "2"]

    straight = start_torchrun(args(tmp_path / "straight"), free_port(), tmp_path / "straight.txt")
    assert straight.wait(timeout=300) == 0, (tmp_path / "straight.txt").read_text()[-3000:]

    log = tmp_path / "preempted.txt"
    preempted = start_torchrun(args(tmp_path / "preempted"), free_port(), log)
    try:
        wait_for(f"Train: [1/2][{random.Random(0).randrange(3)}/4]", log, preempted)
        os.killpg(preempted.pid, signal.SIGTERM)  # as a scheduler signals every process of a job
        preempted.wait(timeout=120)
    finally:
        preempted.kill()
    folder = run_folder(tmp_path / "preempted")
    ckpt = torch.load(os.path.join(folder, "checkpoint.pth"), weights_only=False)
    assert ckpt["epoch"] == 0 and 0 < ckpt["epoch_step"] < 4, log.read_text()[-3000:]
    assert f"stopped by SIGTERM at epoch 1 step {ckpt['epoch_step']}" in log.read_text()

    resumed = start_torchrun(args(tmp_path / "preempted"), free_port(), tmp_path / "resumed.txt")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.txt").read_text()[-3000:]
    expected = open(os.path.join(run_folder(tmp_path / "straight"), "log_rank0.txt")).read()
    got = open(os.path.join(folder, "log_rank0.txt")).read()
    assert f"start training at epoch 1 step {ckpt['epoch_step']}" in got
    assert epoch_losses(got, 1) == epoch_losses(expected, 1) and len(epoch_losses(expected, 1)) == 4
    a = torch.load(os.path.join(run_folder(tmp_path / "straight"), "checkpoint.pth"), weights_only=False)
    b = torch.load(os.path.join(folder, "checkpoint.pth"), weights_only=False)
    assert a["epoch"] == b["epoch"] == 1 and "epoch_step" not in b
    for key, value in a["model"].items():  # weights, queues, step counter
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.timeout(600)  # three runs, one after the other
def test_killed_right_after_a_periodic_save_resumes_exactly(image_folder, tmp_path):
    """TRAIN.SAVE_EVERY_STEPS 2 (4 steps per epoch): SIGKILL as soon as the save after epoch 1's
    step 1 is logged; the restart goes on from step 2 and ends as an uninterrupted run."""

    def args(output):
        return pretrain_args("synco", image_folder, output, "TRAIN.SAVE_EVERY_STEPS", "2")

    straight = run_script(args(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]

    log_path = tmp_path / "killed.txt"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        killed = subprocess.Popen([sys.executable, *args(tmp_path / "killed")], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for("Train: [1/2][1/4]", log_path, killed)
        deadline = time.monotonic() + 120
        while "saved " not in log_path.read_text().split("Train: [1/2][1/4]")[-1]:
            assert killed.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.005)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        killed.kill()
    folder = run_folder(tmp_path / "killed")
    ckpt = torch.load(os.path.join(folder, "checkpoint.pth"), weights_only=False)
    assert (ckpt["epoch"], ckpt["epoch_step"]) == (0, 2)  # epoch 0 done, 2 steps of epoch 1

    resumed = run_script(args(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = open(os.path.join(folder, "log_rank0.txt")).read()
    expected = open(os.path.join(run_folder(tmp_path / "straight"), "log_rank0.txt")).read()
    assert "start training at epoch 1 step 2" in got
    assert epoch_losses(got.split("start training at epoch 1 step 2")[-1], 1) == epoch_losses(expected, 1)[2:]
    a = torch.load(os.path.join(run_folder(tmp_path / "straight"), "checkpoint.pth"), weights_only=False)
    b = torch.load(os.path.join(folder, "checkpoint.pth"), weights_only=False)
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.timeout(600)  # two torchrun runs at once, one of them restarted
def test_torchrun_restarts_the_group_after_a_stalled_rank_and_resumes_exactly(image_folder, tmp_path):
    """torchrun --max-restarts=1: rank 1 hangs in its first step of epoch 1 in the first attempt
    only; rank 0 fails on the timeout, rank 1 ends at torchrun's SIGTERM, and the second attempt
    (whose rank 1 joins 2 s late, after rank 0 read the store) resumes after epoch 0 and ends as an
    uninterrupted run."""
    stall = {"PYTHONPATH": os.path.join(SHIMS, "stall"), "STALL_RANK": "1", "STALL_AT": "3", "STALL_SECONDS": "600",
             "STALL_ATTEMPT": "0", "STALL_LATE_START": "2"}  # fmt: skip
    log = tmp_path / "restarted.txt"
    args = pretrain_args("moby", image_folder, tmp_path / "restarted", "DIST_TIMEOUT", "8")
    restarted = start_torchrun(args, free_port(), log, "--max-restarts=1", extra_env=stall)
    # meanwhile (the restarted run mostly waits), the same run uninterrupted
    straight_args = pretrain_args("moby", image_folder, tmp_path / "straight")
    straight = start_torchrun(straight_args, free_port(), tmp_path / "s.txt")
    try:
        assert straight.wait(timeout=300) == 0, (tmp_path / "s.txt").read_text()[-3000:]
        assert restarted.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        for proc in (straight, restarted):
            with contextlib.suppress(ProcessLookupError):  # leaves no process behind
                os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    first, second = [x for x in out.splitlines() if x.startswith("error: ")]
    assert first.startswith("error: rank 0 at epoch 1 step 0: waited more than DIST_TIMEOUT 8 s"), first
    assert second == f"error: rank 1 stopped by SIGTERM without saving: another process failed: {first[7:]}"
    folder = run_folder(tmp_path / "restarted")
    got = open(os.path.join(folder, "log_rank0.txt")).read()
    assert f"resumed from {os.path.join(folder, 'checkpoint.pth')} (epoch 0)" in got
    expected = open(os.path.join(run_folder(tmp_path / "straight"), "log_rank0.txt")).read()
    assert epoch_losses(got.split("resumed from")[-1], 1) == epoch_losses(expected, 1)
    a = torch.load(os.path.join(run_folder(tmp_path / "straight"), "checkpoint.pth"), weights_only=False)
    b = torch.load(os.path.join(folder, "checkpoint.pth"), weights_only=False)
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["model"].items():  # weights, queues, step counter
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)
