import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from config import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("imagenet")))


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
