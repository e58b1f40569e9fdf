"""configs/small/: every recipe loads, passes the start-up checks, builds its model, and runs the
values of the reference it cites (MoCo's CIFAR-10 demo, lightly's CIFAR-10 benchmark, solo-learn's
ImageNet-100 recipes)."""

import argparse
import glob
import os

import pytest
import torch
import yaml

import main_linear
from config import check_config, get_config, inert_settings
from models import build_model
from utils import lr_scale

SMALL = sorted(glob.glob("configs/small/*.yaml"))
NAMES = [os.path.basename(path)[: -len(".yaml")] for path in SMALL]


def load(name, recipe=None):
    return get_config(argparse.Namespace(cfg=f"configs/small/{name}.yaml", opts=None), recipe)


def values(config, keys):
    """{dotted key: value} of ``config``."""
    found = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = node[part]
        found[key] = node
    return found


def test_every_framework_backbone_and_dataset_has_a_recipe():
    expected = [
        f"{framework}_{backbone}_{dataset}"
        for framework in ("moby", "byol", "synco")
        for backbone in ("resnet18", "vit_tiny")
        for dataset in ("cifar10", "cifar100", "imagenet100")
    ]
    assert NAMES == sorted(expected)


@pytest.mark.parametrize("name", NAMES)
def test_each_recipe_loads_checks_and_builds(name):
    config = load(name)
    for recipe in (None, main_linear.LINEAR_RECIPE):  # pretraining, and linear evaluation with --cfg
        check_config(load(name, recipe))
    assert inert_settings(config, pretraining=True) == []
    framework, *backbone, dataset = name.split("_")
    backbone = "_".join(backbone)
    m = config.MODEL
    assert (m.TYPE, m.ENCODER, config.DATA.DATASET) == (framework, backbone, dataset)
    cifar = dataset.startswith("cifar")
    assert config.DATA.IMG_SIZE == (32 if cifar else 224)
    assert m.RESNET.CIFAR_STEM == (cifar and backbone == "resnet18")
    assert m.VIT.PATCH_SIZE == (4 if cifar and backbone == "vit_tiny" else 16)
    assert ("cifarstem" in m.NAME) == m.RESNET.CIFAR_STEM and ("patch4" in m.NAME) == (m.VIT.PATCH_SIZE == 4)
    assert m.CONTRAST_MOMENTUM == 0.99
    global_batch = config.DATA.BATCH_SIZE
    assert m.CONTRAST_NUM_NEGATIVE % global_batch == 0
    with torch.device("meta"):
        model = build_model(config, steps_per_epoch=2)
    assert model.encoder.num_features == {"resnet18": 512, "vit_tiny": 192}[backbone]


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("cifar100")])
def test_cifar100_changes_only_the_dataset(name):
    cifar100 = yaml.safe_load(load(name).dump())
    cifar10 = yaml.safe_load(load(name.replace("cifar100", "cifar10")).dump())
    assert cifar100["DATA"].pop("DATASET") == "cifar100" and cifar10["DATA"].pop("DATASET") == "cifar10"
    assert cifar100.pop("BASE") == [f"{name.replace('cifar100', 'cifar10')}.yaml"]
    cifar10.pop("BASE")
    assert cifar100 == cifar10


MOCO_DEMO = {  # facebookresearch/moco colab/moco_cifar10_demo.ipynb
    "DATA.BATCH_SIZE": 512, "TRAIN.BASE_LR": 0.06, "TRAIN.WEIGHT_DECAY": 5e-4, "TRAIN.EPOCHS": 200,
    "TRAIN.WARMUP_EPOCHS": 0, "TRAIN.LR_SCHEDULER.NAME": "cosine", "TRAIN.OPTIMIZER.NAME": "sgd",
    "TRAIN.OPTIMIZER.MOMENTUM": 0.9, "MODEL.CONTRAST_NUM_NEGATIVE": 4096, "MODEL.CONTRAST_MOMENTUM": 0.99,
    "MODEL.CONTRAST_TEMPERATURE": 0.1, "AUG.SSL_AUG_CROP": 0.08,
}  # fmt: skip
LIGHTLY_BYOL = {  # lightly's cifar10_benchmark.py, BYOL at batch 128 (lr 0.06 at 128)
    "DATA.BATCH_SIZE": 128, "TRAIN.BASE_LR": 0.24, "TRAIN.WEIGHT_DECAY": 5e-4, "TRAIN.EPOCHS": 200,
    "TRAIN.WARMUP_EPOCHS": 0, "TRAIN.OPTIMIZER.NAME": "sgd", "TRAIN.OPTIMIZER.MOMENTUM": 0.9,
    "MODEL.CONTRAST_MOMENTUM": 0.99, "MODEL.PROJ_HIDDEN_DIM": 4096, "MODEL.PROJ_DIM": 256,
}  # fmt: skip
SOLO_MOCOV2PLUS = {  # solo-learn imagenet-100/mocov2plus.yaml: lr 0.3 per 256
    "DATA.BATCH_SIZE": 128, "TRAIN.BASE_LR": 0.6, "TRAIN.WEIGHT_DECAY": 1e-4, "TRAIN.EPOCHS": 400,
    "TRAIN.WARMUP_EPOCHS": 10, "TRAIN.OPTIMIZER.NAME": "sgd", "MODEL.CONTRAST_NUM_NEGATIVE": 65536,
    "MODEL.CONTRAST_TEMPERATURE": 0.2,
}  # fmt: skip
SOLO_BYOL = {  # solo-learn imagenet-100/byol.yaml: LARS lr 0.5 per 256, eta 0.02
    "DATA.BATCH_SIZE": 256, "TRAIN.BASE_LR": 1.0, "TRAIN.WEIGHT_DECAY": 1e-6, "TRAIN.EPOCHS": 400,
    "TRAIN.OPTIMIZER.NAME": "lars", "TRAIN.OPTIMIZER.TRUST_COEFFICIENT": 0.02, "MODEL.PROJ_HIDDEN_DIM": 4096,
    "MODEL.PROJ_DIM": 256,
}  # fmt: skip
VIT = {  # solo-learn imagenet-100/mocov3_vit.yaml: AdamW lr 3e-4 per 256
    "DATA.BATCH_SIZE": 512, "TRAIN.BASE_LR": 6e-4, "TRAIN.WEIGHT_DECAY": 0.1, "TRAIN.WARMUP_EPOCHS": 10,
    "TRAIN.OPTIMIZER.NAME": "adamw",
}  # fmt: skip
SYNCO_WINDOW = {  # SynCo's epochs 30-100 of 300, scaled to the run
    200: {"MODEL.SYNTHETIC_START_EPOCH": 20, "MODEL.SYNTHETIC_END_EPOCH": 66},
    400: {"MODEL.SYNTHETIC_START_EPOCH": 40, "MODEL.SYNTHETIC_END_EPOCH": 133},
}
PINNED = {
    **{f"{f}_resnet18_{d}": MOCO_DEMO for f in ("moby", "synco") for d in ("cifar10", "cifar100")},
    **{f"byol_resnet18_{d}": LIGHTLY_BYOL for d in ("cifar10", "cifar100")},
    **{f"{f}_vit_tiny_{d}": {**VIT, "TRAIN.EPOCHS": 200} for f in ("moby", "byol", "synco")
       for d in ("cifar10", "cifar100")},
    **{f"{f}_vit_tiny_imagenet100": {**VIT, "TRAIN.EPOCHS": 400} for f in ("moby", "byol", "synco")},
    "moby_resnet18_imagenet100": SOLO_MOCOV2PLUS,
    "synco_resnet18_imagenet100": SOLO_MOCOV2PLUS,
    "byol_resnet18_imagenet100": SOLO_BYOL,
}  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_each_recipe_runs_its_references_values(name):
    config = load(name)
    expected = PINNED[name]
    if name.startswith("synco"):
        expected = {**expected, **SYNCO_WINDOW[config.TRAIN.EPOCHS], "MODEL.N_HARD": 256}
    assert values(config, expected) == expected


def test_the_learning_rates_are_the_references_at_their_batch():
    """BASE_LR is per 512 images; scaled to each reference's own global batch it is its rate."""
    for name, batch, rate in [("moby_resnet18_cifar10", 512, 0.06), ("byol_resnet18_cifar10", 128, 0.06),
                              ("moby_resnet18_imagenet100", 256, 0.3), ("byol_resnet18_imagenet100", 256, 0.5),
                              ("moby_vit_tiny_imagenet100", 256, 3e-4)]:  # fmt: skip
        assert load(name).TRAIN.BASE_LR * lr_scale(batch, 1, 0) == pytest.approx(rate), name


@pytest.mark.parametrize("name", NAMES)
def test_only_the_imagenet100_recipes_blur(name):
    """The CIFAR references draw no Gaussian blur at 32 px (MoCo's demo, lightly, solo-learn); the
    ImageNet-100 ones keep BYOL's views as they are."""
    assert load(name).AUG.SSL_AUG_BLUR is name.endswith("imagenet100")
