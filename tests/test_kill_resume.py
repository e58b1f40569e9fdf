"""SIGKILL a real run during training and while it writes checkpoints: each restart
resumes from a good checkpoint, and the run ends as if never stopped."""

import glob
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY

from checkpoint import newest_checkpoint, remove_stale_tmp, save_atomic

EPOCHS = 6
CHECKPOINT = re.compile(r"(checkpoint|ckpt_epoch_\d+)\.pth")
# When each run is killed: ("log", text, d) a random 0-d s after the text shows in its
# output; ("tmp", name, 0) as soon as it opens the temporary file of that checkpoint;
# ("file", name, 0) as soon as that file appears.
KILLS = [("log", "] saved ", 1.0), ("tmp", "checkpoint.pth", 0), ("tmp", "ckpt_epoch_*.pth", 0)]


def start(image_folder, output, log_path, epochs=EPOCHS):
    args = ["main_pretrain.py", "--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder,
            "--output", str(output), "--tag", "t", *TINY, "TRAIN.EPOCHS", str(epochs), "SAVE_FREQ", "1"]  # fmt: skip
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def reached(kind, what, proc, log_path, folder):
    if kind == "tmp":
        return bool(glob.glob(os.path.join(folder, f"{what}.tmp.{proc.pid}")))
    if kind == "file":
        return bool(glob.glob(os.path.join(folder, what)))
    return what in log_path.read_text()


def kill_when(kind, what, proc, log_path, folder, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not reached(kind, what, proc, log_path, folder):
        assert proc.poll() is None, f"the run ended before being killed:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.timeout(600)  # a run killed and restarted several times
def test_runs_killed_at_random_moments_resume_and_finish(image_folder, tmp_path):
    rng = random.Random(0)
    output, folder = tmp_path / "out", str(tmp_path / "out" / "*" / "t")
    logs = [tmp_path / f"run{i}.txt" for i in range(len(KILLS) + 1)]
    for (kind, what, max_delay), log in zip(KILLS, logs, strict=False):
        proc = start(image_folder, output, log)
        try:
            kill_when(kind, what, proc, log, folder)
            time.sleep(rng.uniform(0, max_delay))
        finally:
            proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        if kind == "tmp":  # killed mid-write: the torn file is left for the resume to sweep
            assert glob.glob(os.path.join(folder, f"{what}.tmp.{proc.pid}"))

    final = start(image_folder, output, logs[-1])
    try:
        assert final.wait(timeout=120) == 0, logs[-1].read_text()[-3000:]
    finally:
        final.kill()

    outputs = [log.read_text() for log in logs]
    resumed = [re.findall(r"resumed from (\S+) \(epoch \d+\)", out) for out in outputs]
    # a restart may itself be killed while it makes checkpoint.pth current, before it resumes
    assert resumed[0] == [] and all(len(paths) <= 1 for paths in resumed[1:]) and len(resumed[-1]) == 1, resumed
    assert all(CHECKPOINT.fullmatch(os.path.basename(path)) for paths in resumed[1:] for path in paths)
    assert f"Train: [{EPOCHS - 1}/{EPOCHS}]" in outputs[-1]

    (run_folder,) = glob.glob(folder)
    assert not glob.glob(os.path.join(run_folder, "*.tmp.*"))  # the last resume swept them
    assert torch.load(os.path.join(run_folder, "checkpoint.pth"), weights_only=False)["epoch"] == EPOCHS - 1
    numbered = {int(re.search(r"(\d+)\.pth$", p)[1]): p for p in glob.glob(os.path.join(run_folder, "ckpt_*"))}
    for epoch, path in numbered.items():
        assert torch.load(path, map_location="cpu", weights_only=False)["epoch"] == epoch
    # every epoch's numbered checkpoint exists: a kill between the two files of a save loses neither
    assert sorted(numbered) == list(range(EPOCHS))


@pytest.mark.slow
def test_killed_between_the_last_two_saves_the_restart_makes_checkpoint_current(image_folder, tmp_path):
    """SIGKILL the instant the last epoch's ckpt_epoch_{E}.pth appears, before checkpoint.pth
    follows: the restart makes checkpoint.pth that file, and trains nothing."""
    epochs, last = 2, "ckpt_epoch_1.pth"
    output, folder = tmp_path / "out", str(tmp_path / "out" / "*" / "t")
    logs = [tmp_path / "killed.txt", tmp_path / "restarted.txt"]
    proc = start(image_folder, output, logs[0], epochs)
    try:
        kill_when("file", last, proc, logs[0], folder)
    finally:
        proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    (run_folder,) = glob.glob(folder)
    latest = os.path.join(run_folder, "checkpoint.pth")
    assert torch.load(latest, weights_only=False)["epoch"] == epochs - 2  # killed between the two files

    final = start(image_folder, output, logs[1], epochs)
    try:
        assert final.wait(timeout=120) == 0, logs[1].read_text()[-3000:]
    finally:
        final.kill()
    out = logs[1].read_text()
    assert f"run complete: all {epochs} epochs already trained" in out and "start training" not in out
    assert not glob.glob(os.path.join(run_folder, "*.tmp.*"))
    a = torch.load(latest, weights_only=False)
    b = torch.load(os.path.join(run_folder, last), weights_only=False)
    assert a["epoch"] == b["epoch"] == epochs - 1
    for part in ("model", "optimizer", "scaler"):
        assert_same_tensors(a[part], b[part])


def assert_same_tensors(a, b):
    """Nested state dicts ``a`` and ``b`` have the same keys and identical tensors and values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.fixture
def logger():
    log = logging.getLogger("test_kill_resume")
    log.propagate = True
    return log


def test_truncated_checkpoint_is_skipped_for_an_older_good_one(tmp_path, logger, caplog):
    state = {"model": torch.nn.Linear(64, 64).state_dict(), "epoch": 0}
    save_atomic(state, tmp_path / "ckpt_epoch_0.pth")
    save_atomic(dict(state, epoch=1), tmp_path / "checkpoint.pth")
    data = (tmp_path / "checkpoint.pth").read_bytes()
    (tmp_path / "checkpoint.pth").write_bytes(data[: len(data) // 2])
    path, ckpt = newest_checkpoint(str(tmp_path), logger)
    assert path == str(tmp_path / "ckpt_epoch_0.pth") and ckpt["epoch"] == 0
    assert torch.equal(ckpt["model"]["weight"], state["model"]["weight"])
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"skipping unreadable checkpoint {tmp_path / 'checkpoint.pth'}" in warning.getMessage()


def test_temporary_files_of_interrupted_saves_are_removed(tmp_path, logger, monkeypatch):
    save_atomic({"epoch": 3}, tmp_path / "ckpt_epoch_3.pth")
    for name in ("checkpoint.pth.tmp.123", "ckpt_epoch_4.pth.tmp.456"):
        (tmp_path / name).write_bytes(b"torn")
    remove_stale_tmp(str(tmp_path), logger)
    path, ckpt = newest_checkpoint(str(tmp_path), logger)
    assert path == str(tmp_path / "ckpt_epoch_3.pth") and ckpt["epoch"] == 3
    assert sorted(os.listdir(tmp_path)) == ["ckpt_epoch_3.pth"]

    def failing_save(obj, f):
        f.write(b"half")
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="no space"):
        save_atomic({"epoch": 4}, tmp_path / "ckpt_epoch_4.pth")
    assert sorted(os.listdir(tmp_path)) == ["ckpt_epoch_3.pth"]
