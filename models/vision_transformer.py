"""MoCo v3 style Vision Transformers (ViT-T/S/B, patch 16 by default) on timm's ``VisionTransformer``.

    model = vit_small(img_size=224, stop_grad_conv1=True)
    feats = model(images)  # [B, 3, 224, 224] -> [B, 384], the class token after the final norm
    model = vit_tiny(img_size=32, patch_size=4)  # CIFAR: 8 x 8 patches + the class token

Differences from a plain timm ViT, following MoCo v3:
  * a fixed 2D sin-cos position embedding (not trained), built for img_size;
  * MoCo v3 initialisation (xavier-uniform Linear layers, q/k/v treated as
    separate matrices, xavier-uniform patch projection);
  * optionally a frozen patch projection (``stop_grad_conv1``).
"""

import math
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer


def sincos_pos_embed_2d(grid_size, dim, temperature=10000.0, num_prefix_tokens=1):
    """Fixed 2D sin-cos position embedding, [1, num_prefix_tokens + h * w, dim].

    Prefix (class) tokens get zeros. The patch token at row i, column j
    (row-major order) gets ``[sin(i * f), cos(i * f), sin(j * f), cos(j * f)]``
    with ``f = temperature ** -(arange(dim // 4) / (dim // 4))``. On square grids
    this is exactly MoCo v3's ``build_2d_sincos_position_embedding`` (whose
    first, "w", coordinate is the token's row index there).
    """
    h, w = grid_size
    if dim % 4 != 0:
        raise ValueError(f"embed dim {dim} must be divisible by 4 for a 2D sin-cos embedding")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    out_r = rows.flatten()[:, None] * omega[None]  # [h * w, pos_dim]
    out_c = cols.flatten()[:, None] * omega[None]
    patch = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)
    prefix = torch.zeros(num_prefix_tokens, dim)
    return torch.cat([prefix, patch], dim=0)[None]


class VisionTransformerMoCo(VisionTransformer):
    """timm ViT with MoCo v3's fixed sin-cos position embedding and initialisation.

    forward: [B, 3, H, W] -> [B, embed_dim] (class token after the final norm) if
    num_classes == 0, else logits [B, num_classes]. H, W must equal img_size
    (``set_input_size`` changes it).

    Args:
        stop_grad_conv1: freeze the patch projection (weight and bias), as MoCo v3
            does for training stability.
        use_checkpoint: gradient checkpointing over the blocks.
        **kwargs: timm ``VisionTransformer`` arguments.
    """

    def __init__(self, *, stop_grad_conv1=False, use_checkpoint=False, **kwargs):
        super().__init__(weight_init="moco", **kwargs)
        self.pos_embed.requires_grad = False
        if stop_grad_conv1:
            self.patch_embed.proj.weight.requires_grad = False
            self.patch_embed.proj.bias.requires_grad = False
        self.set_grad_checkpointing(use_checkpoint)

    def init_weights(self, mode="", needs_reset=True):
        """timm's 'moco' init of the Linear layers and cls token, then the sin-cos
        position embedding and the patch projection as MoCo v3 sets them."""
        super().init_weights(mode, needs_reset)
        with torch.no_grad():
            self.pos_embed.copy_(self._grid_pos_embed())
            proj = self.patch_embed.proj  # Conv2d [dim, 3, p, p], xavier over its [dim, 3 * p * p] view
            fan_in = proj.weight[0].numel()
            bound = math.sqrt(6.0 / (fan_in + proj.weight.shape[0]))
            nn.init.uniform_(proj.weight, -bound, bound)
            nn.init.zeros_(proj.bias)

    def _grid_pos_embed(self):
        """The sin-cos position embedding of the current patch grid, [1, prefix + h * w, dim]."""
        return sincos_pos_embed_2d(self.patch_embed.grid_size, self.embed_dim, num_prefix_tokens=self.num_prefix_tokens)

    def set_input_size(self, img_size):
        """Take inputs of ``img_size`` (H, W), multiples of the patch size, from now on: the patch
        grid follows, and the position embedding becomes the sin-cos one of the new grid, the one
        a model built at that size has (it is a fixed function of the grid, not learned)."""
        self.patch_embed.set_input_size(img_size=img_size)
        self.pos_embed = nn.Parameter(self._grid_pos_embed().to(self.pos_embed), requires_grad=False)


def _vit(
    embed_dim,
    num_heads,
    *,
    img_size=224,
    patch_size=16,
    drop_path_rate=0.0,
    num_classes=0,
    use_checkpoint=False,
    stop_grad_conv1=False,
) -> VisionTransformerMoCo:
    """Depth 12, mlp ratio 4, qkv bias, LayerNorm eps 1e-6, class token pooling; (img_size /
    patch_size)^2 patch tokens (img_size a multiple of patch_size)."""
    return VisionTransformerMoCo(
        img_size=img_size,
        patch_size=patch_size,
        num_classes=num_classes,
        global_pool="token",
        embed_dim=embed_dim,
        depth=12,
        num_heads=num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        class_token=True,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        stop_grad_conv1=stop_grad_conv1,
        use_checkpoint=use_checkpoint,
    )


def vit_tiny(**kwargs) -> VisionTransformerMoCo:
    """ViT-T/16: 192-d, depth 12, 3 heads; num_features 192. Keyword arguments (all
    optional): img_size, patch_size, drop_path_rate, num_classes, use_checkpoint, stop_grad_conv1."""
    return _vit(192, 3, **kwargs)


def vit_small(**kwargs) -> VisionTransformerMoCo:
    """ViT-S/16 as in MoCo v3: 384-d, depth 12, **12 heads** (DeiT-S / timm's vit_small
    use 6; the head count changes no parameter count); num_features 384."""
    return _vit(384, 12, **kwargs)


def vit_base(**kwargs) -> VisionTransformerMoCo:
    """ViT-B/16: 768-d, depth 12, 12 heads; num_features 768."""
    return _vit(768, 12, **kwargs)
