"""A ResNet-50 through the scripts: BYOL pretraining with LARS, then linear probe and fine-tuning."""

import glob
import os
import shutil

import pytest
import torch

import main_linear
import main_pretrain

# ResNet-50 pretraining and linear evaluation runs in this process: about 7 s on 2 idle cores, a minute on busy ones
pytestmark = pytest.mark.slow

SMALL = ["--batch-size", "4", "--amp-opt-level", "O0", "--opts", "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0",
         "MODEL.PROJ_HIDDEN_DIM", "64", "PRINT_FREQ", "1"]  # fmt: skip
CFG = "configs/byol_resnet50.yaml"


def run(module, image_folder, output, *opts):
    """The script's entry point in this process (a single process, on the CPU)."""
    argv = ["--cfg", CFG, "--data-path", image_folder, "--output", str(output), "--tag", "t", *SMALL, *opts]
    module.run_cli(module.setup, module.main, argv)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def pretrained(image_folder, tmp_path_factory):
    """(output root, run folder) of a one-epoch BYOL ResNet-50 run."""
    out = tmp_path_factory.mktemp("resnet")
    run(main_pretrain, image_folder, out, "TRAIN.EPOCHS", "1")
    (folder,) = glob.glob(os.path.join(out, "byol__resnet50__*", "t"))
    ckpt = load(os.path.join(folder, "checkpoint.pth"))
    assert ckpt["epoch"] == 0 and ckpt["framework"] == {"type": "byol", "encoder": "resnet50"}
    assert int(ckpt["model"]["step"]) == 4  # 16 images, batch 4
    state = ckpt["optimizer"]["state"]  # LARS momentum, one buffer per trainable parameter
    assert len(state) == sum(k.startswith(("encoder.", "projector.", "predictor.")) and "running" not in k
                             and "num_batches" not in k for k in ckpt["model"])  # fmt: skip
    assert all(torch.isfinite(s["momentum_buffer"]).all() for s in state.values())
    yield out, folder
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize("weights", ["freeze", "finetune"])
def test_linear_evaluation(pretrained, image_folder, weights):
    out, folder = pretrained
    run(main_linear, image_folder, out, "TRAIN.EPOCHS", "1", "LINEAR_EVAL.WEIGHTS", weights)
    kind = "linprob" if weights == "freeze" else "ft"
    log = open(os.path.join(folder, f"linear_imagenet_{kind}", "log_rank0.txt")).read()
    assert "EPOCH 0 imagenet val (16 images): top-1" in log
    trained = load(os.path.join(folder, f"linear_imagenet_{kind}", "checkpoint.pth"))["model"]
    assert trained["fc.weight"].shape == (2, 2048)
    backbone = {k[len("encoder.") :]: v for k, v in load(os.path.join(folder, "checkpoint.pth"))["model"].items()
                if k.startswith("encoder.")}  # fmt: skip
    changed = {k for k, v in backbone.items() if not torch.equal(trained[k], v)}
    if weights == "freeze":  # frozen weights and BatchNorm statistics
        assert changed == set()
    else:
        assert {"conv1.weight", "bn1.running_mean", "layer4.2.conv3.weight"} <= changed
