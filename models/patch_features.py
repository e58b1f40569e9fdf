"""Dense feature maps of a frozen encoder at stride 16, at any input size.

    features = PatchFeatures(encoder)             # an encoder of models.build_encoder, weights loaded
    maps = features(frames)                       # [B, 3, H, W] -> [B, D, H / 16, W / 16]
    h, w = features.input_size(480, 854)          # the largest size <= (480, 854) it takes

Which map, per backbone (all on the same grid, one cell per 16 x 16 pixels):

* ViT: the patch tokens of the last block after the final LayerNorm (what DINO's video
  segmentation uses; the class token is dropped). The position embedding is resampled to the
  frame's patch grid (bicubic, as timm and DINO do); H and W are multiples of 16.
* Swin: the output of stage 3 (stride 16; 384-d for Swin-T/S, 512-d for Swin-B), not stage 4
  (stride 32): on the ViT's grid, so a label map is as fine as a ViT/16's and
  DAVIS.NEIGHBORHOOD means the same distance in pixels. Every stage up to 3 keeps the window it
  was built with (7 at 224 px), so its relative-position biases are used as trained: H and W
  are multiples of 16 x 7 = 112 at 224 px, so that the windows tile each stage's map.
* ResNet: the output of layer3 (stride 16, 1024-d); H and W are multiples of 16.

The encoders run their own (timm's) ``forward_intermediates``; nothing of a forward pass is
rewritten here. ViT and Swin are resized on a copy kept per input size: the encoder given
stays as it is, and each copy is resampled from it once.
"""

import copy
import math

import torch
import torch.nn as nn
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .swin_transformer import PATCH_SIZE, stage_window_sizes

STRIDE = 16
SWIN_STAGE = 2  # the third stage (stride 16)
RESNET_STAGE = 3  # of act1, layer1, layer2, layer3 (stride 16), layer4


class PatchFeatures(nn.Module):
    """Feature maps [B, D, H / 16, W / 16] of a ViT/16, a Swin (stage 3) or a ResNet (layer3)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        if isinstance(encoder, VisionTransformer):
            if tuple(encoder.patch_embed.patch_size) != (STRIDE, STRIDE):
                raise ValueError(f"a ViT with patch {encoder.patch_embed.patch_size}; patch {STRIDE} is needed")
            self.multiple = (STRIDE, STRIDE)
            self.description = "ViT patch tokens of the last block, after the final norm"
        elif isinstance(encoder, SwinTransformer):
            self.windows = stage_window_sizes(encoder.patch_embed.img_size, len(encoder.layers))
            # stage s (0-based) runs on a map of stride PATCH_SIZE * 2**s with windows[s]
            self.multiple = tuple(
                math.lcm(*(PATCH_SIZE * 2**s * self.windows[s][axis] for s in range(SWIN_STAGE + 1))) for axis in (0, 1)
            )
        elif isinstance(encoder, ResNet):
            self.multiple = (STRIDE, STRIDE)
        else:
            raise ValueError(f"no patch features for a {type(encoder).__name__}; ViT, Swin and ResNet have them")
        self.encoder = encoder.eval().requires_grad_(False)
        self._resized = {}  # (H, W) -> a copy of the encoder for that input size

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The largest input size (H, W) <= (height, width) that the encoder takes."""
        return tuple(max(m, s // m * m) for s, m in zip((height, width), self.multiple))

    def _encoder_for(self, size: tuple[int, int]) -> nn.Module:
        encoder = self.encoder
        if isinstance(encoder, ResNet) or tuple(encoder.patch_embed.img_size) == size:
            return encoder
        if size not in self._resized:
            resized = copy.deepcopy(encoder)
            if isinstance(encoder, SwinTransformer):
                resized.set_input_size(img_size=size, window_size=self.windows)
            else:
                resized.set_input_size(img_size=size)
            self._resized[size] = resized
        return self._resized[size]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised images, H and W multiples of ``multiple`` -> [B, D, H / 16, W / 16]."""
        size = tuple(images.shape[-2:])
        if any(s % m for s, m in zip(size, self.multiple)):
            raise ValueError(f"input size {size} is not a multiple of {self.multiple}: see input_size()")
        encoder = self._encoder_for(size)
        if isinstance(encoder, VisionTransformer):
            (maps,) = encoder.forward_intermediates(images, indices=1, norm=True, intermediates_only=True)
        else:
            stage = SWIN_STAGE if isinstance(encoder, SwinTransformer) else RESNET_STAGE
            (maps,) = encoder.forward_intermediates(images, indices=[stage], stop_early=True, intermediates_only=True)
        return maps
