"""ResNet encoders: architecture, features, drop path, and one training step of each framework.

Structure checks build on the meta device (no weight initialisation); only ResNet-50
and ResNet-18 run forward, at 32 px.
"""

import argparse

import pytest
import torch
import torch.nn as nn
import torchvision

from config import get_config
from models import build_encoder, build_model
from models.build import ENCODERS
from models.resnet import BASIC_DEPTHS, DEPTHS
from optimizer import build_optimizer

# torchvision's ResNets have timm's layout and key names (ResNet-200 is timm's only)
TORCHVISION = {"resnet18": torchvision.models.resnet18, "resnet34": torchvision.models.resnet34,
               "resnet50": torchvision.models.resnet50, "resnet101": torchvision.models.resnet101,
               "resnet152": torchvision.models.resnet152}  # fmt: skip


def _on_meta(factory, **kwargs):
    with torch.device("meta"):
        return factory(**kwargs)


def resnet_params(name, num_classes=0, stem_kernel=7):
    """Parameters of a ResNet (He et al., 2016; stride on the 3x3 conv), in closed form: basic blocks
    (3x3, 3x3) for ResNet-18/34, bottlenecks (1x1, 3x3, 1x1 four times wider) for the others."""
    basic = name in BASIC_DEPTHS
    n = stem_kernel * stem_kernel * 3 * 64 + 2 * 64  # stem conv, BN
    in_ch = 64
    for stage, blocks in enumerate(DEPTHS[name]):
        width = 64 * 2**stage
        out = width if basic else 4 * width
        for block in range(blocks):
            if basic:  # 2 convs, 2 BNs
                n += 9 * in_ch * width + 9 * width * out + 2 * (width + out)
            else:  # 3 convs, 3 BNs
                n += in_ch * width + 9 * width * width + width * out + 2 * (width + width + out)
            if block == 0 and (stage > 0 or in_ch != out):  # projection shortcut: 1x1 conv + BN
                n += in_ch * out + 2 * out
            in_ch = out
    return n + (in_ch * num_classes + num_classes if num_classes else 0)


@pytest.mark.parametrize("name", list(DEPTHS))
def test_architecture(name):
    model = _on_meta(ENCODERS[name])
    assert model.num_features == (512 if name in BASIC_DEPTHS else 2048)
    assert tuple(len(getattr(model, f"layer{i}")) for i in range(1, 5)) == DEPTHS[name]
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == resnet_params(name)
    assert not any(k.startswith("fc.") for k in state)  # num_classes 0: no head
    if name in TORCHVISION:  # same keys and shapes, the classifier aside
        with torch.device("meta"):
            reference = TORCHVISION[name]().state_dict()
        assert {k: v.shape for k, v in state.items()} == {
            k: v.shape for k, v in reference.items() if not k.startswith("fc.")
        }


def test_published_parameter_counts():
    """With a 1000-class head: 11.69M, 21.80M, 25.56M, 44.55M, 60.19M (torchvision), 64.67M (ResNet-200)."""
    published = {"resnet18": 11.689512, "resnet34": 21.797672, "resnet50": 25.557032, "resnet101": 44.549160,
                 "resnet152": 60.192808, "resnet200": 64.673832}  # fmt: skip
    for name, millions in published.items():
        model = _on_meta(ENCODERS[name], num_classes=1000)
        assert sum(p.numel() for p in model.parameters()) == round(millions * 1e6), name


@pytest.mark.parametrize("num_classes", [0, 10])
def test_resnet50_forward_backward(num_classes):
    torch.manual_seed(0)
    model = ENCODERS["resnet50"](num_classes=num_classes)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, num_classes or 2048) and torch.isfinite(out).all()
    if not num_classes:  # features: the global average of layer4's map after its ReLU
        torch.testing.assert_close(out, model.forward_features(x).mean(dim=(2, 3)))
        assert (out >= 0).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # timm's (and the original's) init: each residual branch's last BN starts at zero
    assert all((block.bn3.weight == 0).all() for block in model.layer1)


@pytest.mark.parametrize("name", list(DEPTHS))
def test_drop_path_rate_reaches_blocks(name):
    model = _on_meta(ENCODERS[name], drop_path_rate=0.3)
    blocks = [b for i in range(1, 5) for b in getattr(model, f"layer{i}")]
    rates = [b.drop_path.drop_prob if b.drop_path is not None else 0.0 for b in blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)
    plain = _on_meta(ENCODERS[name])
    assert all(b.drop_path is None for i in range(1, 5) for b in getattr(plain, f"layer{i}"))


def test_use_checkpoint_same_values():
    torch.manual_seed(0)
    plain = ENCODERS["resnet50"]().eval()
    ckpt = ENCODERS["resnet50"](use_checkpoint=True).eval()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ckpt(x), plain(x), rtol=0, atol=0)


# -----------------------------------------------------------------------------
# The CIFAR stem (MODEL.RESNET.CIFAR_STEM)
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DEPTHS))
def test_cifar_stem_replaces_conv1_and_the_max_pool(name):
    model = _on_meta(ENCODERS[name], cifar_stem=True)
    conv1 = model.conv1
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size, conv1.stride, conv1.padding) == (
        3, 64, (3, 3), (1, 1), (1, 1),
    )  # fmt: skip
    assert conv1.bias is None and isinstance(model.maxpool, nn.Identity)
    assert sum(p.numel() for p in model.parameters()) == resnet_params(name, stem_kernel=3)
    plain = _on_meta(ENCODERS[name]).state_dict()  # the rest of the network is the standard one
    assert {k: v.shape for k, v in model.state_dict().items() if k != "conv1.weight"} == {
        k: v.shape for k, v in plain.items() if k != "conv1.weight"
    }
    assert [info["reduction"] for info in model.feature_info] == [1, 1, 2, 4, 8]


def test_resnet18_cifar_stem_at_32_px():
    """512 features from a 4 x 4 layer4 map of a 32 px image (1 x 1 with the standard stem); the
    new conv1 is initialised as timm initialises convolutions, and gradients reach every weight."""
    torch.manual_seed(0)
    model = ENCODERS["resnet18"](cifar_stem=True)
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 512, 4, 4)
    assert ENCODERS["resnet18"]().forward_features(x).shape == (2, 512, 1, 1)
    out = model(x)
    assert out.shape == (2, 512) and torch.isfinite(out).all()
    fan_out = 64 * 3 * 3  # kaiming normal, fan out, ReLU gain
    assert model.conv1.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.15)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("encoder", ["resnet18", "resnet50", "vit_tiny"])
def test_build_encoder_passes_the_cifar_stem_to_resnets_only(encoder):
    config = get_config()
    config.defrost()
    config.merge_from_list(["MODEL.ENCODER", encoder, "DATA.IMG_SIZE", 32, "MODEL.RESNET.CIFAR_STEM", True])
    config.freeze()
    with torch.device("meta"):
        model = build_encoder(config, drop_path_rate=0.0)
    if encoder.startswith("resnet"):
        assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity)
        assert model.num_features == {"resnet18": 512, "resnet50": 2048}[encoder]
    else:  # a ViT ignores the key
        assert model.patch_embed.proj.kernel_size == (16, 16)


def test_build_encoder_from_config():
    config = get_config()
    config.defrost()
    config.merge_from_list(["MODEL.ENCODER", "resnet101", "DATA.IMG_SIZE", 64])
    config.freeze()
    with torch.device("meta"):
        encoder = build_encoder(config, drop_path_rate=0.0, num_classes=7)
    assert type(encoder).__name__ == "ResNet" and len(encoder.layer3) == 23
    assert encoder.get_classifier().out_features == 7


# -----------------------------------------------------------------------------
# One training step of each framework, with its shipped ResNet-50 config
# -----------------------------------------------------------------------------

TINY = ["DATA.IMG_SIZE", 32, "MODEL.PROJ_HIDDEN_DIM", 64, "MODEL.PROJ_DIM", 16, "MODEL.CONTRAST_NUM_NEGATIVE", 8,
        "MODEL.N_HARD", 4, "MODEL.SYNTHETIC_START_EPOCH", 0, "TRAIN.EPOCHS", 2]  # fmt: skip


def resnet_config(framework):
    args = argparse.Namespace(cfg=f"configs/{framework}_resnet50.yaml", opts=[str(v) for v in TINY])
    return get_config(args)


@pytest.mark.parametrize("framework", ["moby", "byol", "synco"])
def test_one_training_step(framework, tmp_path):
    config = resnet_config(framework)
    torch.manual_seed(0)
    model = build_model(config, steps_per_epoch=2)
    optimizer = build_optimizer(config, model)
    assert type(optimizer).__name__ == {"moby": "SGD", "byol": "Lars", "synco": "SGD"}[framework]
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(4, 3, 32, 32, generator=g) for _ in range(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    model.train()
    out = model(x1, x2)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"encoder.conv1.weight", "encoder.layer4.2.bn3.bias", "predictor.linear_out.weight"} <= changed
    assert {"encoder.bn1.running_mean", "encoder_k.bn1.running_mean"} <= changed  # both encoders saw a batch
    assert int(after["step"]) == 1
    # the target followed the online encoder's initial weights (the step came after its update)
    torch.testing.assert_close(after["encoder_k.conv1.weight"], before["encoder.conv1.weight"])
    assert not any(p.requires_grad for p in model.encoder_k.parameters())

    # checkpoint round trip: a fresh model loads it and computes the same loss
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    torch.manual_seed(123)
    restored = build_model(config, steps_per_epoch=2)
    restored.load_state_dict(ckpt["model"])
    restored_optimizer = build_optimizer(config, restored)
    restored_optimizer.load_state_dict(ckpt["optimizer"])
    losses = []
    for m in (model, restored):
        torch.manual_seed(5)  # SynCo's random draws
        with torch.no_grad():
            losses.append(m.eval()(x1, x2)["loss"])
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(restored.encoder(x1), model.encoder(x1), rtol=0, atol=0)
    buffers = [s["momentum_buffer"] for s in restored_optimizer.state_dict()["state"].values()]
    assert buffers and all(torch.isfinite(b).all() for b in buffers)
