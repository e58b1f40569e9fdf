"""ResNet-18/34/50/101/152/200 backbones: timm's ``ResNet`` (torchvision's layout).

    model = resnet50()
    feats = model(images)  # [B, 3, H, W] -> [B, 2048], global average pool after layer4

ResNet-18/34 have basic blocks (two 3x3 convolutions, 512 features), the others
bottleneck blocks (1x1, 3x3, 1x1; 2048 features). timm's standard initialisation
(Kaiming-normal convolutions, the last BatchNorm of each residual branch at zero), as
the original code built them with timm. ``drop_path_rate`` is timm's stochastic depth
over the residual branches, rising linearly to the rate in the last block; the original
passed none (rate 0), and the ResNet configs set 0.

``cifar_stem`` replaces the stem for 32 px images, as MoCo's CIFAR-10 demo, solo-learn and
lightly build their CIFAR ResNets: a 3x3 stride-1 convolution (64 channels, no bias) instead
of the 7x7 stride-2 one, and no max-pool, so layer4 sees 4 x 4 of a 32 px image, not 1 x 1.
"""

import timm
import torch.nn as nn
from timm.models.resnet import ResNet

# blocks in layer1..layer4: basic blocks for ResNet-18/34, bottlenecks for the others
BASIC_DEPTHS = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
}
BOTTLENECK_DEPTHS = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
    "resnet200": (3, 24, 36, 3),
}
DEPTHS = {**BASIC_DEPTHS, **BOTTLENECK_DEPTHS}


def use_cifar_stem(model: ResNet) -> None:
    """Give ``model`` the CIFAR stem in place: conv1 a 3x3 stride-1 convolution initialised as
    timm initialises its convolutions, maxpool the identity; ``feature_info`` follows (each map
    is 4 times finer: layer3 at stride 4, not 16)."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    for info in model.feature_info:
        info["reduction"] = max(1, info["reduction"] // 4)


def _resnet(name, *, img_size=224, drop_path_rate=0.0, num_classes=0, use_checkpoint=False, cifar_stem=False) -> ResNet:
    """forward: [B, 3, H, W] -> [B, num_features] if num_classes == 0, else logits [B, num_classes] (head ``fc``).

    The network is fully convolutional: ``img_size`` is accepted like the other
    backbones' and unused (any H, W >= 32 works; with ``cifar_stem`` any H, W >= 8).
    """
    del img_size
    model = timm.create_model(name, num_classes=num_classes, drop_path_rate=drop_path_rate)
    if cifar_stem:
        use_cifar_stem(model)
    model.set_grad_checkpointing(use_checkpoint)
    return model


def resnet18(**kwargs) -> ResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2); num_features 512. Keyword arguments (all optional):
    img_size (unused), drop_path_rate, num_classes, use_checkpoint, cifar_stem."""
    return _resnet("resnet18", **kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet-34: basic blocks (3, 4, 6, 3); num_features 512."""
    return _resnet("resnet34", **kwargs)


def resnet50(**kwargs) -> ResNet:
    """ResNet-50: bottleneck blocks (3, 4, 6, 3); num_features 2048."""
    return _resnet("resnet50", **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101: bottleneck blocks (3, 4, 23, 3); num_features 2048."""
    return _resnet("resnet101", **kwargs)


def resnet152(**kwargs) -> ResNet:
    """ResNet-152: bottleneck blocks (3, 8, 36, 3); num_features 2048."""
    return _resnet("resnet152", **kwargs)


def resnet200(**kwargs) -> ResNet:
    """ResNet-200: bottleneck blocks (3, 24, 36, 3); num_features 2048."""
    return _resnet("resnet200", **kwargs)
