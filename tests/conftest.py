"""Fixtures and helpers shared by the test modules (imported as ``from conftest import ...``;
no test module imports another)."""

import glob
import os
import pickle
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from yacs.config import CfgNode as CN

from config import get_config
from data import set_loader_epoch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now (the system picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_image_folder(root, classes=2, per_class=8, size=(40, 36), seed=0):
    """An ImageNet-style folder ``root/{train,val}/class_i/img_j.png`` of random images."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            folder = os.path.join(root, split, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            for j in range(per_class):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"img_{j}.png"))
    return root


def write_pickle(path, obj):
    """Pickle ``obj`` to ``path`` (a ``pathlib.Path``), making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root, rng):
    """A tiny CIFAR-10 in torchvision's own files under ``root`` (a ``pathlib.Path``):
    ``cifar-10-batches-py/data_batch_1..5`` (2 images each), ``test_batch`` (3), ``batches.meta``
    (3 classes); returns (classes, training images, test images). torchvision checks the files'
    md5 against the real archive's: a test reading them makes ``check_md5`` pass."""
    base = root / "cifar-10-batches-py"
    for i in range(1, 6):
        write_pickle(
            base / f"data_batch_{i}", {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [i % 3, 2]}
        )
    write_pickle(base / "test_batch", {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [0, 1, 2]})
    write_pickle(base / "batches.meta", {"label_names": ["airplane", "cat", "dog"], "num_cases_per_batch": 2})
    return 3, 10, 3


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("imagenet")))


def read_scalars(folder):
    """{tag: [(step, value), ...]} of the event files in ``folder``."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run_script(args, cwd=ROOT, timeout=600, env=None):
    """Run a command from the project root on the CPU; returns the CompletedProcess."""
    full_env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def small_config(model_type, **opts):
    """vit_tiny at 32 px with small heads and queue: the real classes, cheap to run."""
    config = get_config()
    config.defrost()
    config.merge_from_list(
        [
            "MODEL.TYPE",
            model_type,
            "MODEL.ENCODER",
            "vit_tiny",
            "DATA.IMG_SIZE",
            32,
            "MODEL.PROJ_HIDDEN_DIM",
            64,
            "MODEL.PROJ_DIM",
            16,
            "MODEL.CONTRAST_NUM_NEGATIVE",
            16,
            "MODEL.N_HARD",
            8,
            "MODEL.N1",
            2,
            "MODEL.N2",
            3,
            "MODEL.N3",
            4,
            "MODEL.N4",
            5,
            "MODEL.N5",
            6,
            "MODEL.N6",
            7,
            "TRAIN.EPOCHS",
            4,
        ]
    )
    for key, value in opts.items():
        config.merge_from_list([key.replace("__", "."), value])
    config.freeze()
    return config


def views(batch=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)


class RunsCode:
    """An object whose unpickling runs ``source`` (it pickles as a call of builtins.exec)."""

    def __init__(self, source):
        self.source = source

    def __reduce__(self):
        return exec, (self.source,)


def save_code_running_checkpoint(path, marker, legacy_format=False):
    """A checkpoint whose loading, if it unpickled everything, would create the file ``marker``."""
    payload = RunsCode(f"open({str(marker)!r}, 'w').write('ran')")
    state = {"model": {"encoder.pos_embed": torch.zeros(1, 5, 8)}, "epoch": 0, "config": payload}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy_format)


# ----------------------------------------------------------------------------
# Tiny main_pretrain.py runs
# ----------------------------------------------------------------------------
TINY = [
    "--batch-size", "4", "--amp-opt-level", "O0",
    "--opts", "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0", "MODEL.CONTRAST_NUM_NEGATIVE", "16",
    "MODEL.PROJ_HIDDEN_DIM", "64", "TRAIN.EPOCHS", "2", "PRINT_FREQ", "1",
    "MODEL.N_HARD", "8", "MODEL.N1", "2", "MODEL.N2", "2", "MODEL.N3", "2", "MODEL.N4", "2", "MODEL.N5", "2",
    "MODEL.N6", "2", "MODEL.SYNTHETIC_START_EPOCH", "0",
]  # fmt: skip


def wait_for(text, log_path, proc, timeout=120.0):
    """Wait until ``text`` shows in the output file ``log_path`` of the running process ``proc``."""
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text():
        assert proc.poll() is None, f"the run ended before {text!r}:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {text!r}"
        time.sleep(0.01)


def run_folder(output):
    (folder,) = glob.glob(os.path.join(output, "*", "t"))
    return folder


# ----------------------------------------------------------------------------
# The pretraining data package's config and epochs
# ----------------------------------------------------------------------------
def make_config(data_root: str, **data) -> CN:
    cfg = CN()
    cfg.SEED = 7
    cfg.DATA = CN()
    cfg.DATA.DATA_PATH = data_root
    cfg.DATA.DATASET = "imagenet"
    cfg.DATA.TRANSFER_ROOT = data_root
    cfg.DATA.BATCH_SIZE = 4
    cfg.DATA.IMG_SIZE = 32
    cfg.DATA.INTERPOLATION = "bicubic"
    cfg.DATA.ZIP_MODE = False
    cfg.DATA.CACHE_MODE = "no"
    cfg.DATA.PIN_MEMORY = False
    cfg.DATA.NUM_WORKERS = 0
    cfg.DATA.GPU_AUG = False
    cfg.AUG = CN()
    cfg.AUG.SSL_AUG_TYPE = "byol"
    cfg.AUG.SSL_AUG_CROP = 0.08
    cfg.AUG.SSL_AUG_BLUR = True
    cfg.AUG.SSL_AUG_INTERPOLATION = "bilinear"
    for key, value in data.items():
        setattr(cfg.DATA, key, value)
    return cfg


def epoch_batches(data_loader, epoch: int) -> list:
    set_loader_epoch(data_loader, epoch)
    return list(data_loader)


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for ((a_views, a_params), at), ((b_views, b_params), bt) in zip(a, b, strict=True):
        assert torch.equal(at, bt)
        for x, y in zip((*a_views, *a_params), (*b_views, *b_params), strict=True):
            assert torch.equal(x, y)


# ----------------------------------------------------------------------------
# Swin Transformer weights in the original code's layout
# ----------------------------------------------------------------------------
SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), img_size=224, patch_size=4, window_size=7)


def perturbed(model, seed=0):
    """``model`` in eval mode with every weight moved off its initialisation (LayerNorms included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def original_relative_position_index(win):
    """The original WindowAttention's saved buffer: [win * win, win * win] indices into the bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij")).flatten(1)  # [2, N]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (win - 1)  # [N, N, 2], from 0
    return rel[..., 0] * (2 * win - 1) + rel[..., 1]


def original_attn_mask(res, win, shift):
    """The original shifted-window block's saved buffer: [num windows, win * win, win * win] of 0 / -100."""
    regions = torch.zeros(res, res)
    spans = (slice(0, -win), slice(-win, -shift), slice(-shift, None))
    for i, (h, w) in enumerate((h, w) for h in spans for w in spans):
        regions[h, w] = i
    windows = regions.view(res // win, win, res // win, win).permute(0, 2, 1, 3).reshape(-1, win * win)
    mask = windows[:, None, :] - windows[:, :, None]
    return mask.masked_fill(mask != 0, -100.0)


def to_original_layout(state, embed_dim, depths, img_size, patch_size, window_size):
    """A timm / project Swin state dict as the original Swin Transformer saved it."""
    original = {}
    for key, value in state.items():
        match = re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key)
        if match:  # merging before stage i in timm = after stage i - 1 in the original
            key = f"layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}"
        original[key] = value
    res = img_size // patch_size
    for i, depth in enumerate(depths):
        win = min(window_size, res)  # the original's rule: one window, no shift, once the map is no larger
        for j in range(depth):
            original[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = original_relative_position_index(win)
            if j % 2 == 1 and res > window_size:
                original[f"layers.{i}.blocks.{j}.attn_mask"] = original_attn_mask(res, win, win // 2)
        if i < len(depths) - 1:  # the original's key names and shapes
            dim = embed_dim * 2**i
            assert original[f"layers.{i}.downsample.reduction.weight"].shape == (2 * dim, 4 * dim)
            assert original[f"layers.{i}.downsample.norm.weight"].shape == (4 * dim,)
        res //= 2
    assert not any(k.startswith(f"layers.{len(depths) - 1}.downsample") for k in original)
    return original
