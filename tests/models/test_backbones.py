"""Backbones: shapes, gradients, sizes, MoCo v3 ViT details, Swin windows at small images.

Full-width, full-depth models; forward/backward at 32 px to stay fast on a CPU.
Checks that only need the structure build the model on the meta device, which
skips the (slow on a CPU) weight initialisation.
"""

import math

import pytest
import torch

from config import get_config
from models import build_encoder
from models.swin_transformer import stage_window_sizes, swin_base, swin_small, swin_tiny
from models.vision_transformer import vit_base, vit_small, vit_tiny

FACTORIES = {
    "swin_tiny": swin_tiny,
    "swin_small": swin_small,
    "swin_base": swin_base,
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
}
NUM_FEATURES = {
    "swin_tiny": 768,
    "swin_small": 768,
    "swin_base": 1024,
    "vit_tiny": 192,
    "vit_small": 384,
    "vit_base": 768,
}
# (embed_dim, depths, heads) as published; used by the closed-form parameter count
SWIN_ARCH = {
    "swin_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin_small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin_base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
}
VIT_ARCH = {"vit_tiny": (192, 3), "vit_small": (384, 12), "vit_base": (768, 12)}
# published parameter counts with a 1000-class head (Swin paper, DeiT/timm; MoCo v3's
# 12-head ViT-S has exactly DeiT-S's parameters), in millions
PUBLISHED_M = {
    "swin_tiny": 28.29,
    "swin_small": 49.61,
    "swin_base": 87.77,
    "vit_tiny": 5.72,
    "vit_small": 22.05,
    "vit_base": 86.57,
}


def _on_meta(factory, **kwargs):
    """The model with every tensor on the meta device: shapes and structure, no values."""
    with torch.device("meta"):
        return factory(**kwargs)


def _blocks(model):
    """Transformer blocks in order, for either family."""
    if hasattr(model, "layers"):
        return [b for stage in model.layers for b in stage.blocks]
    return list(model.blocks)


def _swin_param_count(dim, depths, heads, window=7, num_classes=1000):
    def block(d, h):  # 2 LayerNorms, qkv, proj, relative position bias table, MLP 4d
        return 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * window - 1) ** 2 * h + (8 * d * d + 5 * d)

    n = 3 * 4 * 4 * dim + dim + 2 * dim  # patch conv + patch norm
    for stage, (depth, h) in enumerate(zip(depths, heads)):
        d = dim * 2**stage
        if stage > 0:  # patch merging: LayerNorm(4 d_in) + Linear(4 d_in, 2 d_in) without bias
            n += 2 * 2 * d + 2 * d * d
        n += depth * block(d, h)
    d = dim * 2 ** (len(depths) - 1)
    return n + 2 * d + d * num_classes + num_classes


def _vit_param_count(dim, img_size=224, num_classes=1000):
    tokens = (img_size // 16) ** 2 + 1
    n = 3 * 16 * 16 * dim + dim + dim + tokens * dim  # patch conv, cls token, pos_embed
    n += 12 * (12 * dim * dim + 13 * dim)
    return n + 2 * dim + dim * num_classes + num_classes


@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_forward_backward(name, num_classes):
    torch.manual_seed(0)
    model = FACTORIES[name](img_size=32, num_classes=num_classes)
    assert model.num_features == NUM_FEATURES[name]
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_classes or NUM_FEATURES[name])
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, pname
            assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", list(FACTORIES))
def test_param_count_at_224(name):
    model = _on_meta(FACTORIES[name], num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    if name in SWIN_ARCH:
        expected = _swin_param_count(*SWIN_ARCH[name])
        _, depths, stage_heads = SWIN_ARCH[name]
        heads = [b.attn.num_heads for b in _blocks(model)]
        assert heads == [h for d, h in zip(depths, stage_heads) for _ in range(d)]
    else:
        expected = _vit_param_count(VIT_ARCH[name][0])
        assert [b.attn.num_heads for b in _blocks(model)] == [VIT_ARCH[name][1]] * 12
    assert n == expected
    assert n / 1e6 == pytest.approx(PUBLISHED_M[name], rel=1e-3)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_layer_norm_eps_is_the_originals(name):
    """The original Swin: eps 1e-6 but in each block's norm2 (nn.LayerNorm(dim), 1e-5). MoCo v3's ViT: 1e-6."""
    model = _on_meta(FACTORIES[name])
    eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    if name in SWIN_ARCH:
        blocks = sum(SWIN_ARCH[name][1])
        mlp_norms = {n for n in eps if n.endswith(".norm2")}
        assert len(mlp_norms) == blocks and all(eps[n] == 1e-5 for n in mlp_norms)
        others = set(eps) - mlp_norms  # patch embedding, each norm1, 3 patch mergings, final norm
        assert others == {"patch_embed.norm", "norm"} | {n for n in eps if n.endswith((".norm1", "downsample.norm"))}
        assert len(others) == 1 + blocks + 3 + 1 and all(eps[n] == 1e-6 for n in others)
        if name == "swin_tiny":
            assert (len(eps), len(others)) == (29, 17)
    else:
        assert len(eps) == 2 * 12 + 1 and set(eps.values()) == {1e-6}


def test_vit_small_has_12_heads():
    model = _on_meta(vit_small)
    assert len(model.blocks) == 12
    assert all(b.attn.num_heads == 12 and b.attn.head_dim == 32 for b in model.blocks)


def _reference_sincos(h, w, dim, temperature=10000.0):
    """[1 + h*w, dim]: zeros for the class token, then per patch (row i, column j)
    sin(i f_k), cos(i f_k), sin(j f_k), cos(j f_k) for f_k = temperature ** (-k / (dim/4))."""
    q = dim // 4
    rows = [[0.0] * dim]
    for i in range(h):
        for j in range(w):
            f = [temperature ** (-k / q) for k in range(q)]
            rows.append(
                [math.sin(i * x) for x in f]
                + [math.cos(i * x) for x in f]
                + [math.sin(j * x) for x in f]
                + [math.cos(j * x) for x in f]
            )
    return torch.tensor(rows)


@pytest.mark.parametrize("factory, img_size", [(vit_tiny, 224), (vit_small, 64)])
def test_vit_sincos_pos_embed(factory, img_size):
    model = factory(img_size=img_size)
    grid = img_size // 16
    assert not model.pos_embed.requires_grad
    assert model.pos_embed.shape == (1, 1 + grid * grid, model.num_features)
    expected = _reference_sincos(grid, grid, model.num_features)
    torch.testing.assert_close(model.pos_embed[0], expected, atol=1e-5, rtol=0)


def test_vit_patch_4_at_32_px():
    """CIFAR's ViT-T/4: 8 x 8 patch tokens and the class token, the sin-cos embedding of that grid,
    the patch projection xavier-initialised over its 3 * 4 * 4 inputs."""
    torch.manual_seed(0)
    model = vit_tiny(img_size=32, patch_size=4)
    assert model.patch_embed.proj.kernel_size == (4, 4) and model.patch_embed.grid_size == (8, 8)
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 64 + 1, 192)
    torch.testing.assert_close(model.pos_embed[0], _reference_sincos(8, 8, 192), atol=1e-5, rtol=0)
    bound = math.sqrt(6.0 / (3 * 4 * 4 + 192))
    assert 0.99 * bound < model.patch_embed.proj.weight.abs().max() <= bound
    out = model(x)
    assert out.shape == (2, 192) and torch.isfinite(out).all()


def test_build_encoder_passes_the_patch_size_to_vits_only():
    config = get_config(recipe=["DATA.IMG_SIZE", 32, "MODEL.VIT.PATCH_SIZE", 4, "MODEL.ENCODER", "vit_small"])
    with torch.device("meta"):
        assert build_encoder(config, drop_path_rate=0.0).patch_embed.grid_size == (8, 8)
    config = get_config(recipe=["DATA.IMG_SIZE", 32, "MODEL.VIT.PATCH_SIZE", 4, "MODEL.ENCODER", "swin_tiny"])
    with torch.device("meta"):
        assert build_encoder(config, drop_path_rate=0.0).patch_embed.proj.kernel_size == (4, 4)  # Swin's own


def test_vit_moco_init():
    torch.manual_seed(0)
    model = vit_small()
    dim = model.num_features
    # qkv [3 dim, dim]: xavier-uniform bound of one [dim, dim] q/k/v matrix, which is
    # wider than the bound sqrt(6 / (3 dim + dim)) of the fused matrix
    qkv = model.blocks[0].attn.qkv.weight
    v = math.sqrt(6.0 / (dim + dim))
    assert 0.99 * v < qkv.abs().max() <= v
    fc1 = model.blocks[0].mlp.fc1.weight  # xavier: sqrt(6 / (fan_in + fan_out))
    assert fc1.abs().max() <= math.sqrt(6.0 / (dim + 4 * dim))
    proj = model.patch_embed.proj.weight
    assert proj.abs().max() <= math.sqrt(6.0 / (3 * 16 * 16 + dim))
    assert proj.abs().max() > 0.99 * math.sqrt(6.0 / (3 * 16 * 16 + dim))
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all((b == 0).all() for b in biases) and (model.patch_embed.proj.bias == 0).all()
    assert model.cls_token.abs().max() < 1e-5


def test_vit_stop_grad_conv1():
    model = vit_small(img_size=32, stop_grad_conv1=True)
    proj = model.patch_embed.proj
    assert not proj.weight.requires_grad and not proj.bias.requires_grad
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert proj.weight.grad is None and proj.bias.grad is None
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.cls_token.grad is not None


@pytest.mark.parametrize("name", list(FACTORIES))
def test_drop_path_rate_reaches_blocks(name):
    model = _on_meta(FACTORIES[name], drop_path_rate=0.3)
    blocks = _blocks(model)
    assert isinstance(blocks[0].drop_path1, torch.nn.Identity)  # the first block: rate 0
    assert blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)
    assert blocks[-1].drop_path2.drop_prob == pytest.approx(0.3)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]
    assert rates == sorted(rates)


@pytest.mark.parametrize("factory", [swin_tiny, vit_tiny])
def test_use_checkpoint_same_values(factory):
    torch.manual_seed(0)
    plain = factory(img_size=32).eval()
    ckpt = factory(img_size=32, use_checkpoint=True).eval()
    ckpt.load_state_dict(plain.state_dict())
    layers = getattr(ckpt, "layers", None)
    assert all(s.grad_checkpointing for s in layers) if layers else ckpt.grad_checkpointing
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out_plain = plain(x)
    (grad_x_plain,) = torch.autograd.grad(out_plain.square().sum(), x)
    out_ckpt = ckpt(x)
    (grad_x_ckpt,) = torch.autograd.grad(out_ckpt.square().sum(), x)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    torch.testing.assert_close(grad_x_ckpt, grad_x_plain)


def test_unknown_kwargs_raise():
    with pytest.raises(TypeError):
        swin_tiny(window_size=12)
    with pytest.raises(TypeError):
        swin_tiny(stop_grad_conv1=True)  # a ViT-only option
    with pytest.raises(TypeError):
        vit_small(depth=6)
    with pytest.raises(TypeError):
        vit_small(32)  # keyword arguments only


def test_swin_window_sizes():
    assert stage_window_sizes(224) == ((7, 7),) * 4
    assert stage_window_sizes(64) == ((4, 4), (4, 4), (4, 4), (2, 2))
    assert stage_window_sizes(32) == ((4, 4), (4, 4), (2, 2), (1, 1))
    with pytest.raises(ValueError):
        stage_window_sizes(176)  # a 22x22 stage would get 2x2 windows


@pytest.mark.parametrize("img_size", [32, 64, 224])
def test_swin_windows_tile_every_stage(img_size):
    """No block relies on timm's padding; shifted blocks shift by half a window."""
    model = _on_meta(swin_tiny, img_size=img_size)
    for stage in model.layers:
        for i, block in enumerate(stage.blocks):
            (h, w), (wh, ww) = block.input_resolution, block.window_size
            assert h % wh == 0 and w % ww == 0
            smaller = h > wh
            assert block.shift_size == ((wh // 2, ww // 2) if i % 2 and smaller else (0, 0))
    if img_size == 224:  # the standard Swin: window 7, shift 3 except on the 7x7 last stage
        assert [b.window_size for b in _blocks(model)] == [(7, 7)] * 12
        assert [b.shift_size for b in model.layers[2].blocks] == [(0, 0), (3, 3)] * 3
        assert [b.shift_size for b in model.layers[3].blocks] == [(0, 0), (0, 0)]


def test_swin_shifted_window_does_not_wrap_around():
    """At 32 px, stage 0 is 8x8 with 4x4 windows shifted by 2: the cyclic shift
    must be masked, so the top row never sees the bottom row."""
    torch.manual_seed(0)
    stage = swin_tiny(img_size=32).layers[0].eval()
    x = torch.randn(1, 8, 8, 96)
    y = x.clone()
    y[:, 7] += torch.randn(1, 8, 96)
    torch.testing.assert_close(stage(y)[:, 0], stage(x)[:, 0], rtol=0, atol=0)
    assert not torch.allclose(stage(y)[:, 4], stage(x)[:, 4])  # same shifted window as row 7
