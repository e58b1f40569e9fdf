"""Dense feature maps of a frozen encoder at stride 16, at (nearly) any input size.

    features = PatchFeatures(encoder)             # an encoder of models.build_encoder, weights loaded
    height, width = features.input_size(480, 832) # the size nearest to 480 x 832 that it takes
    maps = features(frames)                       # [B, 3, height, width] -> [B, D, height / 16, width / 16]

Which map, per backbone (all on the same grid, one cell per 16 x 16 pixels):

* ViT: the patch tokens of the last block after the final LayerNorm (what DINO's video
  segmentation uses; the class token is dropped).
* Swin: the output of stage 3 (stride 16; 384-d for Swin-T/S, 512-d for Swin-B), not stage 4
  (stride 32): on the ViT's grid, so a label map is as fine as a ViT/16's (stage 4 has half as
  many cells a side, its boundaries in 32-pixel steps) and a neighbourhood counted in cells means
  the same distance in pixels.
* ResNet: the output of layer3 (stride 16; 1024-d, 256-d for ResNet-18/34). A ResNet with the CIFAR
  stem (layer3 at stride 4) and a ViT with another patch than 16 are refused.

Other input sizes than the encoder was built for go through ``AnySizeEncoder`` (models/input_size.py):
a ViT's copy has the sin-cos position embedding of the new patch grid; a Swin's has at each stage
the largest window up to the trained one that tiles its map (a 480 x 864 frame: 6 x 6 in stages
1-3), with the trained relative-position biases of the offsets that window reaches. The encoders run their own
(timm's) ``forward_intermediates``: nothing of a forward pass is rewritten here.
"""

import torch
import torch.nn as nn
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .input_size import AnySizeEncoder

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
            self.description = "ViT patch tokens of the last block, after the final norm"
        elif isinstance(encoder, SwinTransformer):
            self.description = "Swin stage 3 output"
        elif isinstance(encoder, ResNet):
            stride = encoder.feature_info[RESNET_STAGE]["reduction"]
            if stride != STRIDE:
                raise ValueError(f"a ResNet with layer3 at stride {stride} (the CIFAR stem); stride {STRIDE} is needed")
            self.description = "ResNet layer3 output"
        else:
            raise ValueError(f"no patch features for a {type(encoder).__name__}; ViT, Swin and ResNet have them")
        self.encoder = AnySizeEncoder(encoder.eval().requires_grad_(False))

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The input size (H, W) nearest to (height, width) that the encoder takes."""
        return tuple(self.encoder.input_size(height, width))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised images, (H, W) a size ``input_size`` returns -> [B, D, H / 16, W / 16]."""
        model = self.encoder.model_for(tuple(images.shape[-2:]))
        if isinstance(model, VisionTransformer):
            (maps,) = model.forward_intermediates(images, indices=1, norm=True, intermediates_only=True)
        else:
            stage = SWIN_STAGE if isinstance(model, SwinTransformer) else RESNET_STAGE
            (maps,) = model.forward_intermediates(images, indices=[stage], stop_early=True, intermediates_only=True)
        return maps
