"""Evaluations rebuild the encoder a checkpoint was pretrained with: the settings that shape it
(models.build.ENCODER_SHAPE_KEYS: backbone, image size, a ViT's patch size, a ResNet's stem) come
from the checkpoint's stored config, whatever --cfg says."""

import argparse
import logging

import pytest
import torch
import yaml

from config import ConfigError, get_config
from distributed import DistEnv
from models import build_encoder
from models.build import ENCODER_SHAPE_KEYS, encoder_shape_keys
from pretrained import inherit_encoder_settings, load_run_encoder

LOGGER = logging.getLogger("test_encoder_shape")
# (what pretraining ran, the evaluation's --cfg values the checkpoint's replace)
CASES = {
    "vit_patch4": (
        ["MODEL.ENCODER", "vit_tiny", "DATA.IMG_SIZE", 32, "MODEL.VIT.PATCH_SIZE", 4],
        ["MODEL.ENCODER", "vit_tiny", "DATA.IMG_SIZE", 224],
    ),
    "resnet18_cifar_stem": (
        ["MODEL.ENCODER", "resnet18", "DATA.IMG_SIZE", 32, "MODEL.RESNET.CIFAR_STEM", True],
        ["MODEL.ENCODER", "resnet50", "DATA.IMG_SIZE", 224],
    ),
}


def test_the_keys_include_the_patch_size_and_the_stem():
    assert {"MODEL.VIT.PATCH_SIZE", "MODEL.RESNET.CIFAR_STEM"} <= set(ENCODER_SHAPE_KEYS)
    assert encoder_shape_keys("vit_tiny") == ("MODEL.ENCODER", "DATA.IMG_SIZE", "MODEL.VIT.PATCH_SIZE")
    assert encoder_shape_keys("resnet18") == ("MODEL.ENCODER", "DATA.IMG_SIZE", "MODEL.RESNET.CIFAR_STEM")
    assert encoder_shape_keys("swin_tiny") == ("MODEL.ENCODER", "DATA.IMG_SIZE")


def write_checkpoint(path, pretrain_opts, drop=()):
    """A pretraining checkpoint of an encoder built with ``pretrain_opts``, its config without the
    dotted keys ``drop`` (a run from before they existed); returns the encoder's weights."""
    config = get_config(recipe=pretrain_opts)
    torch.manual_seed(0)
    encoder = build_encoder(config, drop_path_rate=0.0)
    stored = yaml.safe_load(config.dump())
    for key in drop:
        *groups, leaf = key.split(".")
        node = stored
        for group in groups:
            node = node[group]
        del node[leaf]
    torch.save(
        {
            "model": {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
            "framework": {"type": "moby", "encoder": config.MODEL.ENCODER},
            "config": yaml.safe_dump(stored),
            "epoch": 0,
        },
        path,
    )
    return encoder.state_dict()


def evaluation_config(path, opts):
    """The config of an evaluation of the checkpoint ``path`` whose --cfg sets ``opts``."""
    return get_config(recipe=[*opts, "LINEAR_EVAL.PRETRAINED", str(path)])


@pytest.mark.parametrize("case", list(CASES))
def test_an_evaluation_rebuilds_the_pretrained_encoder(tmp_path, case):
    pretrain_opts, eval_opts = CASES[case]
    path = tmp_path / "checkpoint.pth"
    weights = write_checkpoint(path, pretrain_opts)
    config = evaluation_config(path, eval_opts)
    held, notes = inherit_encoder_settings(config, argparse.Namespace(opts=None), DistEnv())
    ran = get_config(recipe=pretrain_opts)
    assert (config.MODEL.ENCODER, config.DATA.IMG_SIZE) == (ran.MODEL.ENCODER, 32)
    assert (config.MODEL.VIT.PATCH_SIZE, config.MODEL.RESNET.CIFAR_STEM) == (
        ran.MODEL.VIT.PATCH_SIZE, ran.MODEL.RESNET.CIFAR_STEM,
    )  # fmt: skip
    assert len(notes) == 1 and notes[0].startswith(f"from the config of {path}: ")
    model = build_encoder(config, drop_path_rate=0.0, num_classes=10)
    load_run_encoder(model, config, LOGGER, held)  # raises on any missing key or shape
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())


def test_a_run_from_before_the_patch_size_key_had_patch_16(tmp_path):
    path = tmp_path / "checkpoint.pth"
    write_checkpoint(path, ["MODEL.ENCODER", "vit_tiny", "DATA.IMG_SIZE", 32], drop=["MODEL.VIT.PATCH_SIZE"])
    config = evaluation_config(path, CASES["vit_patch4"][0])  # a --cfg of patch 4
    _, notes = inherit_encoder_settings(config, argparse.Namespace(opts=None), DistEnv())
    assert config.MODEL.VIT.PATCH_SIZE == 16
    assert notes == [
        f"from the config of {path}: MODEL.VIT.PATCH_SIZE: 4 -> 16 (the checkpoint's settings replace those of "
        "--cfg and the defaults)"
    ]


def test_an_explicit_patch_size_that_contradicts_the_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pth"
    write_checkpoint(path, CASES["vit_patch4"][0])
    config = evaluation_config(path, ["MODEL.ENCODER", "vit_tiny", "DATA.IMG_SIZE", 32])
    with pytest.raises(ConfigError, match=r"^--opts MODEL.VIT.PATCH_SIZE 16 contradicts .*PATCH_SIZE 4"):
        inherit_encoder_settings(config, argparse.Namespace(opts=["MODEL.VIT.PATCH_SIZE", "16"]), DistEnv())
