"""A diverging run stops with a clear message and never overwrites a good checkpoint."""

import filecmp
import os

import pytest
import torch
from conftest import TINY, run_folder, run_script

pytestmark = pytest.mark.slow  # real training runs in other processes


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(image_folder, tmp_path):
    base = ["main_pretrain.py", "--cfg", "configs/byol_vit_tiny.yaml", "--data-path", image_folder,
            "--output", str(tmp_path), "--tag", "t", *TINY]  # fmt: skip
    # one good epoch, then resumed with a learning rate that must diverge
    first = run_script([*base, "TRAIN.EPOCHS", "1"])
    assert first.returncode == 0, first.stderr[-2000:]
    folder = run_folder(tmp_path)
    good = torch.load(os.path.join(folder, "checkpoint.pth"), weights_only=False)
    os.remove(os.path.join(folder, "checkpoint.pth"))

    diverging = run_script([*base, "TRAIN.EPOCHS", "3", "TRAIN.BASE_LR", "1e12", "TRAIN.WARMUP_EPOCHS", "0",
                            "TRAIN.CLIP_GRAD", "0.0", "--accept-changes"])  # fmt: skip
    assert diverging.returncode != 0
    assert "Traceback" not in diverging.stderr
    (line,) = [x for x in diverging.stderr.splitlines() if x.startswith("error: ")]
    assert "non-finite" in line and "step" in line and "ckpt_epoch_0.pth" in line
    # nothing saved after the divergence: checkpoint.pth is the resume's copy of ckpt_epoch_0.pth
    assert filecmp.cmp(os.path.join(folder, "checkpoint.pth"), os.path.join(folder, "ckpt_epoch_0.pth"), shallow=False)
    kept = torch.load(os.path.join(folder, "ckpt_epoch_0.pth"), weights_only=False)
    for key, value in good["model"].items():
        assert torch.equal(kept["model"][key], value), key
