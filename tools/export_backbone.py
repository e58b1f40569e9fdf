"""Export the online encoder of a pretraining checkpoint as a plain timm backbone.

    python tools/export_backbone.py output/moby_swin_tiny/run1 swin_tiny_moby

reads the newest readable checkpoint of the run folder (as auto-resume picks it; a
checkpoint file is read as it is), writes ``swin_tiny_moby.safetensors`` and
``swin_tiny_moby.pth`` (the same state dict) and prints the ``timm.create_model(...)``
call that loads it, offline, into a timm model with the features of the project's
encoder: identical for a ViT, equal to within 1e-4 for a Swin (timm's Swin has LayerNorm
eps 1e-5 everywhere, the encoder the original's eps, 1e-6 but in each block's norm2).
``<out>`` may end in ``.safetensors``
or ``.pth``: that file is the one the printed call loads, and the other format is
written beside it. Checkpoints of the original MoBY / SynCo-v2 code are converted
(``models/convert.py``). Errors are one line on stderr, exit status 2.
"""

import argparse
import logging
import math
import os
import sys

import timm
import torch
import yaml
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint import read_run_checkpoint  # noqa: E402
from config import ConfigError  # noqa: E402
from models.convert import convert_original_encoder  # noqa: E402
from models.resnet import BOTTLENECK_DEPTHS  # noqa: E402
from models.resnet import DEPTHS as RESNET_DEPTHS  # noqa: E402
from models.swin_transformer import WINDOW_SIZE, stage_window_sizes  # noqa: E402

# MODEL.ENCODER -> (timm model name, keyword arguments it needs beyond num_classes=0)
TIMM_MODELS = {
    "swin_tiny": ("swin_tiny_patch4_window7_224", {}),
    "swin_small": ("swin_small_patch4_window7_224", {}),
    "swin_base": ("swin_base_patch4_window7_224", {}),
    "vit_tiny": ("vit_tiny_patch16_224", {}),
    "vit_small": ("vit_small_patch16_224", {"num_heads": 12}),  # MoCo v3's ViT-S; timm's has 6 heads
    "vit_base": ("vit_base_patch16_224", {}),
    **{name: (name, {}) for name in RESNET_DEPTHS},  # timm's own ResNets, same names
}
# How close timm's model comes to the encoder: timm builds every Swin LayerNorm with eps
# 1e-5, the encoders have the original's (1e-6 but in each block's norm2)
FEATURE_MATCH = {
    "swin": "features equal to the encoder's within 1e-4, not exactly: timm's Swin LayerNorms have eps 1e-5",
    "vit": "the encoder's features",
    "resnet": "the encoder's features",
}
# (embed dim, blocks in stage 3) of each Swin; embed dim of each ViT
SWIN_SHAPES = {(96, 6): "swin_tiny", (96, 18): "swin_small", (128, 18): "swin_base"}
VIT_DIMS = {192: "vit_tiny", 384: "vit_small", 768: "vit_base"}
# (bottleneck blocks, blocks per stage) of each ResNet: ResNet-34 and ResNet-50 have the same depths
RESNET_NAMES = {(name in BOTTLENECK_DEPTHS, depths): name for name, depths in RESNET_DEPTHS.items()}


class ExportError(Exception):
    pass


def infer_encoder_name(state):
    """MODEL.ENCODER of a backbone state dict, from its shapes."""
    if "cls_token" in state:
        name = VIT_DIMS.get(state["cls_token"].shape[-1])
    elif "patch_embed.proj.weight" in state:
        blocks = {k.split(".")[3] for k in state if k.startswith("layers.2.blocks.")}
        name = SWIN_SHAPES.get((state["patch_embed.proj.weight"].shape[0], len(blocks)))
    elif "layer1.0.conv1.weight" in state:
        depths = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        name = RESNET_NAMES.get(("layer1.0.conv3.weight" in state, depths))
    else:
        name = None
    if name is None:
        raise ExportError(f"the encoder weights match no known encoder ({', '.join(TIMM_MODELS)})")
    return name


def config_img_size(config):
    """DATA.IMG_SIZE of a checkpoint's config (a YAML dump or a yacs node), or None."""
    try:
        config = yaml.safe_load(config) if isinstance(config, str) else config
        return int(config["DATA"]["IMG_SIZE"])
    except Exception:
        return None


def timm_call(name, img_size, file, patch_size=16):
    """(timm model name, create_model keyword arguments) that rebuild encoder ``name`` at ``img_size``
    (a ViT with patches of ``patch_size``)."""
    model_name, kwargs = TIMM_MODELS[name]
    kwargs = dict(num_classes=0, **kwargs)
    if name.startswith("vit") and patch_size != 16:
        kwargs["patch_size"] = patch_size
    if img_size != 224 and name not in RESNET_DEPTHS:  # a ResNet takes any image size
        kwargs["img_size"] = img_size
        windows = stage_window_sizes(img_size) if name.startswith("swin") else ()
        if any(w != (WINDOW_SIZE, WINDOW_SIZE) for w in windows):
            kwargs["window_size"] = windows
    default = timm.models.get_pretrained_cfg(model_name)
    overlay = {"file": file}
    if default.custom_load:  # older timm 1.x would read the file as the default tag's .npz
        overlay["custom_load"] = False
    if tuple(default.mean) != IMAGENET_DEFAULT_MEAN or tuple(default.std) != IMAGENET_DEFAULT_STD:
        overlay.update(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)  # as data/transforms.py normalises
    if img_size != 224:
        overlay["input_size"] = (3, img_size, img_size)
    return model_name, dict(kwargs, pretrained=True, pretrained_cfg_overlay=overlay)


def format_call(model_name, kwargs):
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "pretrained_cfg_overlay")
    overlay = ", ".join(f"{k}={v!r}" for k, v in kwargs["pretrained_cfg_overlay"].items())
    return f"timm.create_model({model_name!r}, {args}, pretrained_cfg_overlay=dict({overlay}))"


def check_against_timm(state, model_name, kwargs):
    """Raise ExportError unless ``state`` has exactly the keys and shapes of the timm model."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained", "pretrained_cfg_overlay")}
    with torch.device("meta"):
        expected = timm.create_model(model_name, **kwargs).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ExportError(
            f"the encoder does not fit timm's {model_name}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"mismatched shapes {mismatched[:5]}"
        )


def write(state, path):
    """Save to a temporary file, then rename, in the format of path's suffix."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(state, tmp, metadata={"format": "pt"})
        else:
            torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export(source, out, prefix="encoder.", trust=False):
    """Write the backbone of ``source`` in both formats; returns (the file the call loads,
    MODEL.ENCODER, the timm call). ``source``: a checkpoint file, or a run folder, whose newest
    readable checkpoint is taken as auto-resume takes it; prints which file and epoch.
    ``trust``: unpickle the checkpoint in full (see utils.read_checkpoint)."""
    try:
        checkpoint, ckpt = read_run_checkpoint(source, logging.getLogger("export_backbone"), trust)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    if ckpt is None:
        raise ExportError(f"no checkpoint at {source}")
    model_state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else {}
    state = {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}
    if not state:
        raise ExportError(f"{checkpoint} has no {prefix}* weights (keys: {', '.join(list(model_state)[:5])}, ...)")
    print(f"read {checkpoint} (epoch {ckpt.get('epoch', 'unknown')})")
    name = (ckpt.get("framework") or {}).get("encoder") or infer_encoder_name(state)
    if name not in TIMM_MODELS:
        raise ExportError(f"{checkpoint} holds a {name} encoder; exportable: {', '.join(TIMM_MODELS)}")
    if name.startswith("resnet") and state["conv1.weight"].shape[-1] != 7:
        raise ExportError(
            f"{checkpoint} holds a {name} with the CIFAR stem (MODEL.RESNET.CIFAR_STEM: a 3x3 stride-1 conv1, "
            "no max-pool), which no timm model has: timm's ResNets start with a 7x7 stride-2 conv1 and a max-pool"
        )
    state = convert_original_encoder(state, name)
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}  # no shared storage: safetensors

    patch_size = state["patch_embed.proj.weight"].shape[-1] if name.startswith("vit") else 16
    img_size = config_img_size(ckpt.get("config"))
    if img_size is None:  # no config: the ViT's position table tells, a Swin is taken at 224
        img_size = patch_size * math.isqrt(state["pos_embed"].shape[1] - 1) if name.startswith("vit") else 224
    stem, ext = os.path.splitext(out)
    if ext not in (".safetensors", ".pth"):
        stem, ext = out, ".safetensors"
    model_name, kwargs = timm_call(name, img_size, stem + ext, patch_size)
    check_against_timm(state, model_name, kwargs)
    for suffix in (".safetensors", ".pth"):
        try:
            write(state, stem + suffix)
        except Exception as e:  # OSError, or safetensors' own error type
            raise ExportError(f"cannot write {stem + suffix} ({type(e).__name__}: {e})") from None
    return stem + ext, name, format_call(model_name, kwargs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoint",
        help="a run folder of main_pretrain.py (its newest readable checkpoint) or a checkpoint file "
        "(also of the original code)",
    )
    parser.add_argument("out", help="output file, <out>.safetensors and <out>.pth (or either, named)")
    parser.add_argument("--encoder-prefix", default="encoder.", help="prefix of the encoder's keys in the model")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle the checkpoint in full (can run code): only for a file you trust",
    )
    args = parser.parse_args(argv)
    try:
        primary, name, call = export(args.checkpoint, args.out, args.encoder_prefix, args.trust_checkpoint)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    stem = os.path.splitext(primary)[0]
    match = next(text for family, text in FEATURE_MATCH.items() if name.startswith(family))
    print(f"wrote the {name} backbone to {stem}.safetensors and {stem}.pth; load it ({match}) with")
    print(call)


if __name__ == "__main__":
    main()
