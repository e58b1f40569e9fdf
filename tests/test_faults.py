"""Real runs meeting the faults of a shared cluster: a full disk, corrupted checkpoints,
a stalled rank, a killed data loader worker, preemption."""

import glob
import os

import torch
from conftest import ROOT, run_script
from test_pretrain_e2e import TINY, run_folder

SHIMS = os.path.join(ROOT, "tests", "shims")


def pretrain_args(framework, image_folder, output, *opts):
    return ["main_pretrain.py", "--cfg", f"configs/{framework}_vit_tiny.yaml", "--data-path", image_folder,
            "--output", str(output), "--tag", "t", *TINY, *opts]  # fmt: skip


def error_line(stderr):
    (line,) = [x for x in stderr.splitlines() if x.startswith("error: ")]
    return line


def test_full_disk_stops_with_one_line_and_auto_resume_takes_the_last_good_file(image_folder, tmp_path):
    args = pretrain_args("moby", image_folder, tmp_path, "TRAIN.EPOCHS", "3")
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
    resumed = run_script([*args, "TRAIN.EPOCHS", "3"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = open(os.path.join(folder, "log_rank0.txt")).read()
    for name in ("checkpoint.pth", "ckpt_epoch_1.pth"):
        assert f"WARNING skipping corrupt checkpoint {os.path.join(folder, name)}" in log
    assert f"resumed from {os.path.join(folder, 'ckpt_epoch_0.pth')} (epoch 0)" in log
    assert torch.load(os.path.join(folder, "checkpoint.pth"), weights_only=False)["epoch"] == 2
