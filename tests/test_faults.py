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
