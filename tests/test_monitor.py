"""The monitors of a pretraining run: online linear and k-NN accuracy in the log and TensorBoard,
with no effect on what the run trains, and the folders they switch off for."""

import logging
import os
import re

import numpy as np
import pytest
import torch
from conftest import TINY, read_scalars, run_folder, write_image_folder
from PIL import Image

import main_pretrain
from data.linear import per_class_subset
from distributed import DistEnv
from monitor import OnlineLinear

LOGGER = logging.getLogger("test_monitor")


def pretrain(image_folder, output, *opts, cfg="configs/moby_vit_tiny.yaml"):
    """main_pretrain.py in this process, 2 epochs of 4 steps; returns the run folder."""
    argv = ["--cfg", cfg, "--data-path", str(image_folder), "--output", str(output), "--tag", "t", *TINY, *opts]
    main_pretrain.run_cli(main_pretrain.setup, main_pretrain.main, argv)
    return run_folder(output)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["byol", "synco"])
def test_monitors_report_without_changing_the_run(framework, image_folder, tmp_path):
    """The same seed with the monitors on and off: the same per-step losses and final weights, bit
    for bit; the monitored run logs its accuracies, keeps the classifier in the checkpoint, apart
    from the model."""
    cfg = f"configs/{framework}_vit_tiny.yaml"
    on = pretrain(image_folder, tmp_path / "on", "MONITOR.KNN_EVERY", "1", cfg=cfg)
    off = pretrain(image_folder, tmp_path / "off", "MONITOR.ONLINE_LINEAR", "False", "MONITOR.KNN_EVERY", "0", cfg=cfg)

    on_scalars, off_scalars = read_scalars(on), read_scalars(off)
    assert [s for s, _ in on_scalars["train/loss"]] == list(range(8))
    assert on_scalars["train/loss"] == off_scalars["train/loss"]  # float32 values, exactly
    a, b = load(os.path.join(on, "checkpoint.pth")), load(os.path.join(off, "checkpoint.pth"))
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert b["monitor"] is None and set(a["monitor"]["linear"]) == {"head", "optimizer"}
    assert not any("head" in key or "monitor" in key for key in a["model"])

    log = open(os.path.join(on, "log_rank0.txt")).read()
    assert "monitors: 2 classes; online linear on, k-NN every 1 epochs, bank 16 images, val 16 images" in log
    assert (
        "monitors off: MONITOR.ONLINE_LINEAR False and MONITOR.KNN_EVERY 0"
        in open(os.path.join(off, "log_rank0.txt")).read()
    )
    steps = re.findall(r"Train: \[\d/2\]\[\d/4\].*\blinear_acc1 (\S+) \((\S+)\)", log)
    assert len(steps) == 8 and all(float(v) in (0, 12.5, 25, 37.5, 50, 62.5, 75, 87.5, 100) for v, _ in steps)
    for epoch in (0, 1):
        linear = re.search(rf"EPOCH {epoch} online linear val \(16 images\): top-1 (\S+)% top-5 (\S+)%", log)
        knn = re.search(rf"EPOCH {epoch} k-NN val \(k=20, T=0.07, bank 16 images, 16 val\): top-1 (\S+)% top-5", log)
        assert linear and knn
        assert float(linear[2]) == 100.0  # 2 classes: top-5 holds every class
        assert float(linear[1]) * 16 / 100 == pytest.approx(round(float(linear[1]) * 16 / 100), abs=0.01)
        step = 4 * epoch + 3  # the epoch's last step
        assert on_scalars["monitor/linear_val_acc1"][epoch] == (step, pytest.approx(float(linear[1]), abs=5e-3))
        assert on_scalars["monitor/knn_acc1"][1 + epoch] == (step, pytest.approx(float(knn[1]), abs=5e-3))
    # the initial encoder's k-NN, before the first step: the baseline
    before = re.search(
        r"EPOCH -1 \(before training\) k-NN val \(k=20, T=0.07, bank 16 images, 16 val\): top-1 (\S+)%", log
    )
    assert before and log.index(before[0]) < log.index("Train: [0/2][0/4]")
    assert on_scalars["monitor/knn_acc1"][0] == (0, pytest.approx(float(before[1]), abs=5e-3))
    assert "monitor/linear_val_acc1" not in off_scalars and "train/linear_acc1" not in off_scalars
    assert [s for s, _ in on_scalars["epoch/proj_std"]] == [3, 7] and [s for s, _ in on_scalars["epoch/linear_acc1"]]


@pytest.mark.slow
def test_knn_runs_every_n_epochs_and_after_the_last(image_folder, tmp_path):
    folder = pretrain(image_folder, tmp_path, "TRAIN.EPOCHS", "3", "MONITOR.KNN_EVERY", "2")
    log = open(os.path.join(folder, "log_rank0.txt")).read()
    assert re.findall(r"EPOCH (-?\d)(?: \(before training\))? k-NN val", log) == ["-1", "1", "2"]
    assert re.findall(r"EPOCH (\d) online linear val", log) == ["0", "1", "2"]


def write_flat_folder(root, images=16, nested=False, seed=0):
    """``root/train/<image>`` (or ``root/train/all/<image>``, one folder) of random images."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "train", "all") if nested else os.path.join(root, "train")
    os.makedirs(folder)
    for j in range(images):
        pixels = rng.integers(0, 256, size=(36, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"img_{j}.png"))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("nested", [False, True])
def test_a_folder_without_classes_pretrains_with_the_monitors_off(nested, tmp_path):
    data = write_flat_folder(str(tmp_path / "data"), nested=nested)
    folder = pretrain(data, tmp_path / "out", "TRAIN.EPOCHS", "1")
    log = open(os.path.join(folder, "log_rank0.txt")).read()
    what = "one class" if nested else "no class folders"
    assert "16 training images, 4 steps per epoch" in log
    assert f"monitors off: the training set has {what}" in log
    assert "linear_acc1" not in log and "EPOCH 0 done" in log
    assert load(os.path.join(folder, "checkpoint.pth"))["monitor"] is None


@pytest.mark.slow
def test_without_val_images_the_classifier_trains_and_nothing_is_validated(tmp_path):
    data = write_image_folder(str(tmp_path / "data"))
    os.rename(os.path.join(data, "val"), os.path.join(data, "val_elsewhere"))
    folder = pretrain(data, tmp_path / "out", "TRAIN.EPOCHS", "1")
    log = open(os.path.join(folder, "log_rank0.txt")).read()
    assert f"monitors: 2 classes; online linear on, k-NN off, no val images (no val/ under {data})" in log
    assert re.search(r"Train: \[0/1\]\[3/4\].*\blinear_acc1 ", log)
    assert "online linear val" not in log and "k-NN val" not in log


def test_per_class_subset_spreads_over_each_class_and_caps_it():
    targets = [0] * 10 + [1] * 3 + [2] * 7
    picked = per_class_subset(targets, 4)
    assert picked == sorted(picked) and len(set(picked)) == len(picked)
    by_class = {c: [i for i in picked if targets[i] == c] for c in range(3)}
    assert [len(v) for v in by_class.values()] == [4, 3, 4]
    assert by_class[0][0] == 0 and by_class[0][-1] == 9  # the class's first and last: spread out
    assert per_class_subset(targets, 0) == list(range(20))


def test_online_linear_learns_separable_features_and_leaves_them_alone():
    """A few steps on two separable clusters reach 100% train top-1; the features get no gradient
    and its initial weights come from its seed, not from torch's global generator."""
    torch.manual_seed(0)
    targets = torch.tensor([0] * 4 + [1] * 4)  # 8 images
    view = [torch.randn(4, 6) + 3, torch.randn(4, 6) - 3]  # class 0's, class 1's
    features = torch.cat([*view, *(v + 0.1 * torch.randn(4, 6) for v in view)]).requires_grad_()  # [view 1; view 2]
    targets_both = targets.repeat(2)
    state = torch.get_rng_state()
    linear = OnlineLinear(6, 2, 0.1, DistEnv(), seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    same = OnlineLinear(6, 2, 0.1, DistEnv(), seed=3)
    assert torch.equal(linear.head[1].weight, same.head[1].weight)
    assert not torch.equal(linear.head[1].weight, OnlineLinear(6, 2, 0.1, DistEnv(), seed=4).head[1].weight)
    accs = [float(linear.step(features, targets)) for _ in range(20)]
    assert accs[-1] == 100.0
    assert features.grad is None
    logits = linear.head.eval()(features.detach())
    assert (logits.argmax(1) == targets_both).all()
