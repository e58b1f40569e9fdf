"""Pretraining on CIFAR-10 read from torchvision's own files under DATA.TRANSFER_ROOT (DATA.DATASET
cifar10): the loader's batches, a training step of a small recipe, a main_pretrain.py run without
--data-path, and the one line an offline node without the files stops with.

torchvision checks the md5 of CIFAR's files against the real archive's whenever it opens them
(download or not), which no tiny copy can match: the tests that read the copy make the check pass.
"""

import argparse
import glob
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from conftest import write_cifar10
from torchvision.datasets import utils as tv_utils

import main_pretrain
from cli import run_cli
from config import get_config
from data import DeviceAugment, build_loader, set_loader_epoch
from data.photometric import NUM_PARAMS
from models import build_model

CFG = "configs/small/moby_resnet18_cifar10.yaml"
# the recipe, with small heads and queue, 4 images a batch, on the CPU
SMALL = ["MODEL.PROJ_HIDDEN_DIM", "64", "MODEL.PROJ_DIM", "16", "MODEL.CONTRAST_NUM_NEGATIVE", "8",
         "DATA.NUM_WORKERS", "0", "DATA.BATCH_SIZE", "4"]  # fmt: skip


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """A tiny CIFAR-10 in torchvision's files (10 training images of 3 classes), md5 checks passing."""
    monkeypatch.setattr(tv_utils, "check_md5", lambda *args, **kwargs: True)
    write_cifar10(tmp_path / "cifar", np.random.default_rng(0))
    return tmp_path / "cifar"


def recipe(root):
    opts = [*SMALL, "DATA.TRANSFER_ROOT", str(root)]
    return get_config(argparse.Namespace(cfg=CFG, opts=opts))


def test_the_loader_gives_two_views_of_each_cifar_image_and_its_label(cifar_root):
    config = recipe(cifar_root)
    assert config.DATA.DATASET == "cifar10" and config.DATA.DATA_PATH == ""
    dataset, loader = build_loader(config, rank=0, world_size=1)
    assert type(dataset).__name__ == "CIFAR10" and len(dataset) == 10
    set_loader_epoch(loader, 0)
    batches = list(loader)
    assert len(batches) == 2  # full batches of 4 of the 10 images
    labels = []
    for (views, params), target in batches:
        assert [(v.shape, v.dtype) for v in views] == [((4, 3, 32, 32), torch.uint8)] * 2
        assert [p.shape for p in params] == [(4, NUM_PARAMS)] * 2
        assert not torch.equal(views[0], views[1])
        assert target.dtype == torch.int64
        labels += target.tolist()
    assert all(labels.count(label) <= dataset.targets.count(label) for label in labels)


def test_one_training_step_of_the_cifar_recipe(cifar_root):
    config = recipe(cifar_root)
    _, loader = build_loader(config, rank=0, world_size=1)
    set_loader_epoch(loader, 0)
    (views, params), _ = next(iter(loader))
    augment = DeviceAugment(gpu_aug=False)
    x1, x2 = (augment(v, p) for v, p in zip(views, params, strict=True))
    torch.manual_seed(0)
    model = build_model(config, steps_per_epoch=len(loader)).train()
    assert model.encoder.conv1.kernel_size == (3, 3) and model.encoder.num_features == 512
    loss = model(x1, x2)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(model.encoder.conv1.weight.grad).all() and model.encoder.conv1.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_main_pretrain_reads_cifar_without_a_data_path(cifar_root, tmp_path, capsys):
    """One epoch of the recipe through main_pretrain.py's entry point, in this process."""
    argv = ["--cfg", CFG, "--output", str(tmp_path / "out"), "--tag", "t", "--amp-opt-level", "O0",
            "--opts", *SMALL, "TRAIN.EPOCHS", "1", "PRINT_FREQ", "1", "DATA.DATASET", "cifar10",
            "DATA.TRANSFER_ROOT", str(cifar_root)]  # fmt: skip
    run_cli(main_pretrain.setup, main_pretrain.main, argv)
    assert capsys.readouterr().err == ""
    (folder,) = glob.glob(str(tmp_path / "out" / "moby__resnet18__*cifarstem*" / "t"))
    log = open(os.path.join(folder, "log_rank0.txt")).read()
    assert "10 training images, 2 steps per epoch per process" in log
    ckpt = torch.load(os.path.join(folder, "checkpoint.pth"), map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0 and int(ckpt["model"]["step"]) == 2
    assert ckpt["model"]["encoder.conv1.weight"].shape == (64, 3, 3, 3)  # the CIFAR stem
    assert "DATASET: cifar10" in ckpt["config"]


def test_cifar_missing_on_an_offline_node_is_one_line(tmp_path, capsys, monkeypatch):
    def urlopen(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    root = tmp_path / "cifar"
    argv = ["--cfg", CFG, "--output", str(tmp_path / "out"), "--opts", *SMALL, "DATA.TRANSFER_ROOT", str(root)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main_pretrain.setup, main_pretrain.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = err.splitlines()
    assert line.startswith(f"error: cifar10 is not under {root} (DATA.TRANSFER_ROOT) and could not be downloaded")
    assert f"fetch https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and put it at {root}/cifar-10-python" in line
