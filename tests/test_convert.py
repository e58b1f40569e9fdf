"""models/convert.py: encoders of the original MoBY / SynCo-v2 code load with identical features.

The original layout is written in conftest.py from the original Swin Transformer's code (patch
merging at the end of each stage, saved index and mask buffers), independently of the
conversion it checks, and so is a reference forward pass of the original SynCo-v2 Swin
(its block structure and its LayerNorm eps) straight from such a state dict.
"""

from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import SWIN_T, original_attn_mask, original_relative_position_index, perturbed, to_original_layout
from timm.models.swin_transformer import PatchMerging

from config import ConfigError, get_config
from main_linear import build_classifier
from models.convert import convert_original_encoder
from models.swin_transformer import swin_tiny
from models.vision_transformer import vit_small, vit_tiny
from pretrained import load_pretrained_encoder


def original_patch_merging(x, norm, reduction):
    """The original Swin's PatchMerging: [B, H, W, C] (H, W even) -> [B, H/2, W/2, 2C]."""
    x0 = x[:, 0::2, 0::2]
    x1 = x[:, 1::2, 0::2]
    x2 = x[:, 0::2, 1::2]
    x3 = x[:, 1::2, 1::2]
    return reduction(norm(torch.cat([x0, x1, x2, x3], dim=-1)))


def original_norm(x, state, name, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)


def original_window_attention(x, state, name, num_heads, mask):
    """The original WindowAttention: x [B * nW, N, C] windows, mask [nW, N, N] or None."""
    windows, n, c = x.shape
    qkv = F.linear(x, state[f"{name}.qkv.weight"], state[f"{name}.qkv.bias"])  # [B * nW, N, 3C]
    q, k, v = qkv.reshape(windows, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)  # [B*nW, heads, N, C/heads]
    attn = (q * (c // num_heads) ** -0.5) @ k.transpose(-2, -1)  # [B * nW, heads, N, N]
    index = state[f"{name}.relative_position_index"].view(-1)
    attn = attn + state[f"{name}.relative_position_bias_table"][index].view(n, n, -1).permute(2, 0, 1)
    if mask is not None:
        nw = mask.shape[0]
        attn = (attn.view(windows // nw, nw, num_heads, n, n) + mask[None, :, None]).view(windows, num_heads, n, n)
    x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(windows, n, c)
    return F.linear(x, state[f"{name}.proj.weight"], state[f"{name}.proj.bias"])


def original_block(x, state, name, res, num_heads, win, shift):
    """The original SwinTransformerBlock on x [B, res * res, C]: norm1 eps 1e-6, norm2 eps 1e-5."""
    b, length, c = x.shape
    h = original_norm(x, state, f"{name}.norm1", 1e-6).view(b, res, res, c)
    h = torch.roll(h, (-shift, -shift), dims=(1, 2))
    h = h.view(b, res // win, win, res // win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, win * win, c)
    h = original_window_attention(h, state, f"{name}.attn", num_heads, state.get(f"{name}.attn_mask"))
    h = h.view(b, res // win, res // win, win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(b, res, res, c)
    x = x + torch.roll(h, (shift, shift), dims=(1, 2)).reshape(b, length, c)
    h = original_norm(x, state, f"{name}.norm2", 1e-5)
    h = F.linear(h, state[f"{name}.mlp.fc1.weight"], state[f"{name}.mlp.fc1.bias"])
    return x + F.linear(F.gelu(h), state[f"{name}.mlp.fc2.weight"], state[f"{name}.mlp.fc2.bias"])


def original_swin_features(state, x, embed_dim, depths, img_size, patch_size, window_size, num_heads):
    """The original SynCo-v2 Swin's pooled features [B, C] of images x [B, 3, H, W], from
    an original-layout state dict: every LayerNorm at eps 1e-6 but each block's norm2."""
    x = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch_size)
    res = x.shape[-1]
    x = original_norm(x.flatten(2).transpose(1, 2), state, "patch_embed.norm", 1e-6)  # [B, res * res, C]
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        win = min(window_size, res)  # one window, never shifted, once the map is no larger
        for j in range(depth):
            shift = win // 2 if j % 2 == 1 and res > window_size else 0
            x = original_block(x, state, f"layers.{i}.blocks.{j}", res, heads, win, shift)
        if i < len(depths) - 1:
            merge = f"layers.{i}.downsample"
            norm = partial(original_norm, state=state, name=f"{merge}.norm", eps=1e-6)
            reduction = partial(F.linear, weight=state[f"{merge}.reduction.weight"])
            x = original_patch_merging(x.view(x.shape[0], res, res, -1), norm, reduction)
            res //= 2
            x = x.flatten(1, 2)
    return original_norm(x, state, "norm", 1e-6).mean(dim=1)


def test_patch_merging_needs_no_permutation():
    """timm's reshape / permute orders the 4C channels as the original's x0, x1, x2, x3."""
    torch.manual_seed(0)
    merge = PatchMerging(dim=8).eval()
    with torch.no_grad():
        merge.norm.weight.normal_()
        merge.norm.bias.normal_()
    x = torch.randn(2, 6, 10, 8)  # [B, H, W, C]
    torch.testing.assert_close(merge(x), original_patch_merging(x, merge.norm, merge.reduction), rtol=0, atol=1e-6)
    # a permutation of the neighbours would show: x1 and x2 swapped gives another output
    swapped = torch.cat([x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]], dim=-1)
    assert not torch.allclose(merge(x), merge.reduction(merge.norm(swapped)), atol=1e-3)


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return perturbed(swin_tiny(img_size=224))


def test_window_buffers_match_the_original(swin):
    """The bias table is indexed, and shifted windows masked, as in the original: the table carries over."""
    res = 56
    for stage in swin.layers:
        if not isinstance(stage.downsample, nn.Identity):  # timm merges at the start of stages 1..3
            res //= 2
        for j, block in enumerate(stage.blocks):
            assert torch.equal(block.attn.relative_position_index, original_relative_position_index(7))
            if j % 2 == 1 and res > 7:
                assert torch.equal(block.attn_mask, original_attn_mask(res, 7, 3))
            else:
                assert block.attn_mask is None


def test_original_swin_checkpoint_gives_identical_features(swin, tmp_path):
    original = to_original_layout(swin.state_dict(), **SWIN_T)
    converted = convert_original_encoder(original, "swin_tiny")
    assert set(converted) == set(swin.state_dict())  # a strict load: no missing or unexpected keys
    for key, value in converted.items():  # renamed, never permuted
        assert torch.equal(value, swin.state_dict()[key]), key

    # main_linear reads a checkpoint of the original code (no "framework" entry)
    model = {f"encoder.{k}": v for k, v in original.items()}
    model.update({f"encoder_k.{k}": v for k, v in original.items()})  # same storages: saved once
    model.update({"projector.linear1.weight": torch.zeros(8, 768), "projector_k.linear1.weight": torch.zeros(8, 768),
                  "predictor.linear1.weight": torch.zeros(8, 8), "queue1": torch.zeros(8, 16),
                  "queue2": torch.zeros(8, 16), "queue_ptr": torch.zeros(1, dtype=torch.long)})  # fmt: skip
    path = tmp_path / "ckpt_epoch_7.pth"
    torch.save({"model": model, "optimizer": {}, "epoch": 7, "config": {"MODEL": {"TYPE": "moby"}}}, path)
    config = get_config()
    config.defrost()
    config.merge_from_list(["MODEL.ENCODER", "swin_tiny", "DATA.IMG_SIZE", 224])
    classifier = build_classifier(config, num_classes=3, freeze=True)
    assert load_pretrained_encoder(classifier, str(path), "swin_tiny") == 7
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = classifier.eval().forward_head(classifier.forward_features(x), pre_logits=True)
        torch.testing.assert_close(features, swin(x), rtol=0, atol=1e-5)


def test_original_checkpoint_gives_the_original_swins_features(swin):
    """An original-layout Swin-T checkpoint, converted and loaded, computes what the original
    Swin computes from it (in float64, so only a real difference can exceed the tolerance)."""
    original = to_original_layout(swin.state_dict(), **SWIN_T)
    original = {k: v.double() if v.is_floating_point() else v for k, v in original.items()}
    model = swin_tiny(img_size=224).double().eval()
    model.load_state_dict(convert_original_encoder(original, "swin_tiny"))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        expected = original_swin_features(original, x, **SWIN_T, num_heads=(3, 6, 12, 24))
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
        for norm in model.modules():  # timm's eps, 1e-5 everywhere, would fail this test
            if isinstance(norm, nn.LayerNorm):
                norm.eps = 1e-5
        assert (model(x) - expected).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["swin_tiny", "vit_tiny"])
def test_project_and_vit_weights_are_unchanged(name):
    """This project's Swin layout, and any ViT (the original's keys are timm's), pass through."""
    with torch.device("meta"):
        state = (swin_tiny if name == "swin_tiny" else vit_tiny)(img_size=224).state_dict()
    assert convert_original_encoder(state, name) is state


def test_mobys_deit_small_is_refused_not_loaded_into_12_heads(tmp_path):
    """MoBY's released DeiT-S (Transformer-SSL, MODEL.MOBY.ENCODER deit_small) has 6 heads and the parameter
    shapes of vit_small's 12: it must not load silently."""
    encoder = {f"encoder.{k}": v for k, v in vit_small(img_size=224).state_dict().items()}
    moby_config = {"MODEL": {"TYPE": "moby", "NAME": "moby__deit_small", "MOBY": {"ENCODER": "deit_small"}}}
    path = tmp_path / "moby_deit_small_300ep.pth"
    torch.save({"model": encoder, "epoch": 299, "config": moby_config}, path)
    config = get_config()
    config.defrost()
    config.merge_from_list(["MODEL.ENCODER", "vit_small"])
    classifier = build_classifier(config, num_classes=3, freeze=True)
    with pytest.raises(ConfigError, match="holds a deit_small encoder .MoBY's DeiT with 6 attention heads"):
        load_pretrained_encoder(classifier, str(path), "vit_small")
    # the same weights with our own config load
    torch.save({"model": encoder, "epoch": 299, "config": {"MODEL": {"TYPE": "moby", "ENCODER": "vit_small"}}}, path)
    assert load_pretrained_encoder(classifier, str(path), "vit_small") == 299
