"""Builders: the only place that reads the config to make models."""

from functools import partial

from .byol import BYOL
from .moby import MoBY
from .resnet import resnet18, resnet34, resnet50, resnet101, resnet152, resnet200
from .swin_transformer import swin_base, swin_small, swin_tiny
from .synco import SynCo
from .synthetic_negatives import SyntheticNegativeConfig
from .vision_transformer import vit_base, vit_small, vit_tiny

ENCODERS = {
    "swin_tiny": swin_tiny,
    "swin_small": swin_small,
    "swin_base": swin_base,
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "resnet200": resnet200,
}

FRAMEWORKS = {"moby": MoBY, "byol": BYOL, "synco": SynCo}


# The keys build_encoder reads that shape the encoder's parameters or features, which an evaluation
# takes from the pretraining checkpoint's config (pretrained.inherit_encoder_settings). Its others are the
# evaluation's own: drop path, gradient checkpointing (memory), STOP_GRAD_CONV1 (what training updates).
ENCODER_SHAPE_KEYS = ("MODEL.ENCODER", "DATA.IMG_SIZE", "MODEL.VIT.PATCH_SIZE", "MODEL.RESNET.CIFAR_STEM")
# the keys of ENCODER_SHAPE_KEYS that shape one family only (the encoders whose names start so)
FAMILY_SHAPE_KEYS = {"MODEL.VIT.PATCH_SIZE": "vit", "MODEL.RESNET.CIFAR_STEM": "resnet"}


def encoder_shape_keys(name):
    """The ENCODER_SHAPE_KEYS that shape the encoder ``name`` (all but the other families' own)."""
    return tuple(key for key in ENCODER_SHAPE_KEYS if str(name).startswith(FAMILY_SHAPE_KEYS.get(key, "")))


def build_encoder(config, drop_path_rate, num_classes=0):
    """The backbone named by MODEL.ENCODER: [B, 3, H, W] -> [B, num_features] (or logits)."""
    name = config.MODEL.ENCODER
    if name not in ENCODERS:
        raise ValueError(f"unknown MODEL.ENCODER {name!r}; valid: {', '.join(ENCODERS)}")
    kwargs = dict(
        img_size=config.DATA.IMG_SIZE,
        drop_path_rate=drop_path_rate,
        num_classes=num_classes,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT,
    )
    if name.startswith("vit"):
        kwargs.update(patch_size=config.MODEL.VIT.PATCH_SIZE, stop_grad_conv1=config.MODEL.STOP_GRAD_CONV1)
    if name.startswith("resnet"):
        kwargs["cifar_stem"] = config.MODEL.RESNET.CIFAR_STEM
    return ENCODERS[name](**kwargs)


def build_model(config, steps_per_epoch=1):
    """The self-supervised framework named by MODEL.TYPE.

    ``steps_per_epoch`` (forward passes per epoch) sets the length of the momentum
    schedule and, for SynCo, the epochs in which synthetic negatives are used.
    """
    model_type = config.MODEL.TYPE
    if model_type not in FRAMEWORKS:
        raise ValueError(f"unknown MODEL.TYPE {model_type!r}; valid: {', '.join(FRAMEWORKS)}")
    m = config.MODEL
    kwargs = dict(
        proj_dim=m.PROJ_DIM,
        proj_hidden_dim=m.PROJ_HIDDEN_DIM,
        proj_num_layers=m.PROJ_NUM_LAYERS,
        pred_num_layers=m.PRED_NUM_LAYERS,
        momentum=m.CONTRAST_MOMENTUM,
        steps_per_epoch=steps_per_epoch,
        epochs=config.TRAIN.EPOCHS,
    )
    if model_type in ("moby", "synco"):
        kwargs.update(temperature=m.CONTRAST_TEMPERATURE, num_negative=m.CONTRAST_NUM_NEGATIVE)
    if model_type == "synco":
        kwargs["synthetic"] = SyntheticNegativeConfig(
            n_hard=m.N_HARD,
            num_per_kind=(m.N1, m.N2, m.N3, m.N4, m.N5, m.N6),
            interp_max=m.INTERP_MAX,
            extrap_max=m.EXTRAP_MAX,
            noise_std=m.NOISE_STD,
            perturb_step=m.PERTURB_STEP,
            adversarial_step=m.ADVERSARIAL_STEP,
        )
        kwargs["hard_negative_epochs"] = (m.SYNTHETIC_START_EPOCH, m.SYNTHETIC_END_EPOCH)

    encoder = partial(build_encoder, config)
    return FRAMEWORKS[model_type](encoder(m.ONLINE_DROP_PATH_RATE), encoder(m.TARGET_DROP_PATH_RATE), **kwargs)
