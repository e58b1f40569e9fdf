"""Swin Transformer backbones (Swin-T/S/B), configured from timm's ``SwinTransformer``.

    model = swin_tiny(img_size=224, drop_path_rate=0.2)
    feats = model(images)  # [B, 3, 224, 224] -> [B, 768]

Window size. At 224 px every stage uses the standard 7x7 window (patch grids
56, 28, 14, 7). For other sizes each stage gets the largest window <= 7 that
divides its feature map, so the map is always tiled exactly by windows:

    img 224: grids (56, 28, 14, 7) -> windows (7, 7, 7, 7)
    img 192: grids (48, 24, 12, 6) -> windows (6, 6, 6, 6)
    img  64: grids (16,  8,  4, 2) -> windows (4, 4, 4, 2)
    img  32: grids ( 8,  4,  2, 1) -> windows (4, 4, 2, 1)

A window as large as its feature map is one global window, and timm then turns
the shift off, as the original Swin does for its last stage. The rule avoids
timm's padding path: when the map is not a multiple of the window, timm rolls
the map *before* padding it and builds the shift mask for the padded map, so
tokens that wrapped around the border (top row next to bottom row) share a
mask region and attend to each other, and zero padding tokens are unmasked
keys. Image sizes whose grids have no divisor close to 7 (for example 176 px:
a 22x22 stage would get 2x2 windows) are refused with a ValueError.

LayerNorm eps. The original code's Swin builds its norms with eps 1e-6 (patch
embedding, each block's norm1, each patch merging, the final norm) except each
block's norm2, a plain ``nn.LayerNorm(dim)`` with eps 1e-5: Swin-T has 17 norms at
1e-6 and 12 at 1e-5. timm uses 1e-5 everywhere; these models use the original's,
so its weights give its features.
"""

from collections.abc import Sequence
from functools import partial

import torch.nn as nn
from timm.layers import to_2tuple
from timm.models.swin_transformer import SwinTransformer

PATCH_SIZE = 4
WINDOW_SIZE = 7
NORM_EPS = 1e-6  # every LayerNorm of the original Swin ...
MLP_NORM_EPS = 1e-5  # ... but each block's norm2, before its MLP


def _largest_divisor(n: int, limit: int) -> int:
    """Largest d <= limit with n % d == 0."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def stage_window_sizes(
    img_size, num_stages: int = 4, patch_size: int = PATCH_SIZE, window_size: int | Sequence[int] = WINDOW_SIZE
) -> tuple[tuple[int, int], ...]:
    """Per-stage (h, w) windows that tile each stage's feature map exactly (see module docstring).
    ``window_size``: the largest window, one for all stages or one per stage."""
    limits = [window_size] * num_stages if isinstance(window_size, int) else list(window_size)
    grid = [s // patch_size for s in to_2tuple(img_size)]
    windows = []
    for stage, limit in enumerate(limits):
        if stage > 0:  # PatchMerging halves the map, padding odd sizes
            grid = [(g + 1) // 2 for g in grid]
        win = tuple(_largest_divisor(g, limit) for g in grid)
        if any(g > limit and w < limit // 2 for g, w in zip(grid, win)):
            raise ValueError(
                f"img_size {img_size}: stage {stage} feature map {tuple(grid)} has no window "
                f"close to {limit} that divides it (best {win}); choose another image size"
            )
        windows.append(win)
    return tuple(windows)


def _swin(
    embed_dim, depths, num_heads, *, img_size=224, drop_path_rate=0.0, num_classes=0, use_checkpoint=False
) -> SwinTransformer:
    """A timm Swin (patch 4, patch norm, qkv bias, no absolute position embedding, the
    original's LayerNorm eps).

    forward: [B, 3, H, W] -> [B, num_features] (average-pooled after the final
    norm) if num_classes == 0, else logits [B, num_classes]. H, W must equal img_size.
    """
    model = SwinTransformer(
        img_size=img_size,
        patch_size=PATCH_SIZE,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        window_size=stage_window_sizes(img_size, len(depths)),
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=NORM_EPS),
    )
    for stage in model.layers:
        for block in stage.blocks:
            block.norm2.eps = MLP_NORM_EPS
    model.set_grad_checkpointing(use_checkpoint)
    return model


def swin_tiny(**kwargs) -> SwinTransformer:
    """Swin-T: embed 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24); num_features 768.
    Keyword arguments (all optional): img_size, drop_path_rate, num_classes, use_checkpoint."""
    return _swin(96, (2, 2, 6, 2), (3, 6, 12, 24), **kwargs)


def swin_small(**kwargs) -> SwinTransformer:
    """Swin-S: embed 96, depths (2, 2, 18, 2), heads (3, 6, 12, 24); num_features 768."""
    return _swin(96, (2, 2, 18, 2), (3, 6, 12, 24), **kwargs)


def swin_base(**kwargs) -> SwinTransformer:
    """Swin-B: embed 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32); num_features 1024."""
    return _swin(128, (2, 2, 18, 2), (4, 8, 16, 32), **kwargs)
