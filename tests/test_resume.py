"""A run stopped after an epoch and resumed ends exactly where an uninterrupted run ends."""

import os
import re
import shutil

import pytest
import torch
from conftest import TINY, run_folder, run_script

pytestmark = pytest.mark.slow  # real training runs in other processes


def pretrain(framework, image_folder, output, workers, gpu_aug):
    result = run_script(
        ["main_pretrain.py", "--cfg", f"configs/{framework}_vit_tiny.yaml", "--data-path", image_folder,
         "--output", str(output), "--tag", "t", *TINY, "DATA.NUM_WORKERS", str(workers), "DATA.GPU_AUG", str(gpu_aug)]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return run_folder(output)


def epoch_losses(folder, epoch):
    log = open(os.path.join(folder, "log_rank0.txt")).read()
    return re.findall(rf"Train: \[{epoch}/2\]\[\d+/\d+\].*?\bloss (\S+)", log)


# photometric augmentation in the workers, and batched on the training device (GPU_AUG)
@pytest.mark.parametrize("framework, workers, gpu_aug", [("synco", 2, False), ("byol", 0, True)])
def test_resume_after_first_epoch_is_exact(framework, workers, gpu_aug, image_folder, tmp_path):
    straight = pretrain(framework, image_folder, tmp_path / "straight", workers, gpu_aug)

    # the same run, "stopped" after epoch 0: only epoch 0's checkpoint survives
    resumed_root = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed_root)
    resumed = run_folder(resumed_root)
    os.remove(os.path.join(resumed, "checkpoint.pth"))
    os.remove(os.path.join(resumed, "ckpt_epoch_1.pth"))
    with open(os.path.join(resumed, "log_rank0.txt"), "w"):
        pass
    pretrain(framework, image_folder, resumed_root, workers, gpu_aug)
    assert "resumed from" in open(os.path.join(resumed, "log_rank0.txt")).read()

    expected = epoch_losses(straight, 1)
    assert len(expected) == 4 and epoch_losses(resumed, 1) == expected
    a = torch.load(os.path.join(straight, "checkpoint.pth"), weights_only=False)
    b = torch.load(os.path.join(resumed, "checkpoint.pth"), weights_only=False)
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)
    # the online linear monitor resumes too: its classifier, momentum buffers and val accuracy
    for part in ("head", "optimizer"):
        torch.testing.assert_close(b["monitor"]["linear"][part], a["monitor"]["linear"][part], rtol=0, atol=1e-6)
    monitor_line = r"EPOCH 1 online linear val .*"
    assert re.findall(monitor_line, open(os.path.join(resumed, "log_rank0.txt")).read()) == re.findall(
        monitor_line, open(os.path.join(straight, "log_rank0.txt")).read()
    )
    if framework == "synco":
        assert not torch.equal(
            a["model"]["queue1"],
            torch.load(os.path.join(straight, "ckpt_epoch_0.pth"), weights_only=False)["model"]["queue1"],
        )
