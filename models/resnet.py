"""ResNet-50/101/152/200 backbones: timm's ``ResNet`` (bottleneck blocks, torchvision's layout).

    model = resnet50()
    feats = model(images)  # [B, 3, H, W] -> [B, 2048], global average pool after layer4

timm's standard initialisation (Kaiming-normal convolutions, the last BatchNorm of
each residual branch at zero), as the original code built them with timm.
``drop_path_rate`` is timm's stochastic depth over the residual branches, rising
linearly to the rate in the last block; the original passed none (rate 0), and the
ResNet configs set 0.
"""

import timm
from timm.models.resnet import ResNet

# bottleneck blocks in layer1..layer4
DEPTHS = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
    "resnet200": (3, 24, 36, 3),
}


def _resnet(name, *, img_size=224, drop_path_rate=0.0, num_classes=0, use_checkpoint=False) -> ResNet:
    """forward: [B, 3, H, W] -> [B, 2048] if num_classes == 0, else logits [B, num_classes] (head ``fc``).

    The network is fully convolutional: ``img_size`` is accepted like the other
    backbones' and unused (any H, W >= 32 works).
    """
    del img_size
    model = timm.create_model(name, num_classes=num_classes, drop_path_rate=drop_path_rate)
    model.set_grad_checkpointing(use_checkpoint)
    return model


def resnet50(**kwargs) -> ResNet:
    """ResNet-50: blocks (3, 4, 6, 3); num_features 2048. Keyword arguments (all optional):
    img_size (unused), drop_path_rate, num_classes, use_checkpoint."""
    return _resnet("resnet50", **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101: blocks (3, 4, 23, 3); num_features 2048."""
    return _resnet("resnet101", **kwargs)


def resnet152(**kwargs) -> ResNet:
    """ResNet-152: blocks (3, 8, 36, 3); num_features 2048."""
    return _resnet("resnet152", **kwargs)


def resnet200(**kwargs) -> ResNet:
    """ResNet-200: blocks (3, 24, 36, 3); num_features 2048."""
    return _resnet("resnet200", **kwargs)
