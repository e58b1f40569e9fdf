"""A frozen backbone fed images of other sizes than it was built for (image retrieval feeds
whole images, their aspect ratio kept).

    encoder = AnySizeEncoder(backbone)         # a backbone of models/, built at DATA.IMG_SIZE
    height, width = encoder.input_size(h, w)   # the size nearest to h x w that it takes
    feats = encoder(images)                    # [B, 3, height, width] -> [B, D]

The backbone is left as it is; each other input size gets a copy of it reshaped for that size
(the few most recently used are kept). A copy shares the backbone's weights and buffers: it
owns only what its size changes (a ViT's position embedding, a Swin's bias tables, indices and
masks), so a ViT-B costs no second 340 MB per size, and a new size takes milliseconds:

* ViT: sides are multiples of its patch (16, or MODEL.VIT.PATCH_SIZE); the copy's fixed sin-cos position embedding is
  the one of its patch grid (``VisionTransformerMoCo.set_input_size``), as if built at that size.
* Swin: each stage's windows must tile its feature map (``stage_window_sizes``), so sides are
  multiples of 32 (the last stage's stride) for which every stage has a window no larger than
  the backbone's that divides its map; the nearest such side is taken. A smaller window's
  relative-position bias table is the centre of the backbone's: the same biases for the
  offsets it reaches, not an interpolation.
* ResNet: any size, as it is.

Images are resized to these sides, not padded: padding would add tokens that attention, the
windows and the average pooling would mix into the features.
"""

import copy
import itertools
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformer

from .swin_transformer import PATCH_SIZE, stage_window_sizes
from .vision_transformer import VisionTransformerMoCo


def crop_bias_table(table, window, new_window):
    """The relative-position bias table of ``new_window`` (h, w) cut from that of ``window`` (h0, w0),
    h <= h0 and w <= w0: rows of offsets (dh, dw), |dh| < h, |dw| < w.

    table: [(2 h0 - 1) (2 w0 - 1), heads], row (dh + h0 - 1) (2 w0 - 1) + dw + w0 - 1 (timm's
    ``relative_position_index``) -> [(2 h - 1) (2 w - 1), heads].
    """
    (h0, w0), (h, w) = window, new_window
    if h > h0 or w > w0:
        raise ValueError(f"a {new_window} window reaches offsets the {window} window's bias table lacks")
    grid = table.reshape(2 * h0 - 1, 2 * w0 - 1, -1)
    return grid[h0 - h : h0 + h - 1, w0 - w : w0 + w - 1].reshape(-1, table.shape[-1])


class AnySizeEncoder(nn.Module):
    """``backbone`` for [B, 3, H, W] inputs of every (H, W) that ``input_size`` returns."""

    def __init__(self, backbone, cache_size=4):
        super().__init__()
        self.backbone = backbone
        self.cache_size = cache_size
        self._copies = OrderedDict()  # (H, W) -> reshaped copy, least recently used first; no state of its own
        if isinstance(backbone, VisionTransformerMoCo):
            self.kind, self.built_size = "vit", tuple(backbone.patch_embed.img_size)
        elif isinstance(backbone, SwinTransformer):
            self.kind, self.built_size = "swin", tuple(backbone.patch_embed.img_size)
            # largest window of each stage: a copy's windows fit inside them
            self._window_limits = [min(stage.blocks[0].attn.window_size) for stage in backbone.layers]
        else:  # ResNet
            self.kind, self.built_size = "any", None

    def input_size(self, height, width):
        """The (H, W) nearest to (height, width) that the backbone takes (the larger side on a tie)."""
        if self.kind == "vit":
            patch = self.backbone.patch_embed.patch_size[0]
            return tuple(max(patch, int(side / patch + 0.5) * patch) for side in (height, width))  # ties: larger
        if self.kind == "swin":
            return self._swin_side(height), self._swin_side(width)
        return height, width

    def _swin_side(self, side):
        """The multiple of the last stage's stride nearest to ``side`` (the larger on a tie) whose
        stages all have windows (the rule of ``stage_window_sizes``, within the backbone's windows)."""
        stride = PATCH_SIZE * 2 ** (len(self._window_limits) - 1)
        for k in sorted(range(1, round(side / stride) + 9), key=lambda k: (abs(k * stride - side), -k)):
            try:
                self._swin_windows((k * stride, k * stride))
                return k * stride
            except ValueError:
                continue
        raise ValueError(f"no input side near {side} suits this Swin's windows")  # never: 1 stride always does

    def _swin_windows(self, size):
        return stage_window_sizes(size, len(self._window_limits), window_size=self._window_limits)

    def forward(self, x):
        return self.model_for(tuple(x.shape[-2:]))(x)

    def model_for(self, size):
        """The backbone, or its copy reshaped for inputs of ``size`` (H, W), one that ``input_size`` returns."""
        if self.kind == "any" or tuple(size) == self.built_size:
            return self.backbone
        return self._copy_for(tuple(size))

    def _copy_for(self, size):
        if size in self._copies:
            self._copies.move_to_end(size)
            return self._copies[size]
        if size != self.input_size(*size):
            raise ValueError(f"this {self.kind} backbone takes no {size} input; input_size() gives the nearest it does")
        model = _sharing_copy(self.backbone)
        if self.kind == "vit":
            model.set_input_size(size)
        else:
            with warnings.catch_warnings():  # timm's interpolation of the tables warns; they are replaced
                warnings.simplefilter("ignore")
                model.set_input_size(img_size=size, window_size=list(self._swin_windows(size)))
            with torch.no_grad():  # timm interpolated the bias tables: take the exact ones
                for attn, built in zip(_window_attentions(model), _window_attentions(self.backbone), strict=True):
                    table = crop_bias_table(built.relative_position_bias_table, built.window_size, attn.window_size)
                    attn.relative_position_bias_table = nn.Parameter(table.clone(), requires_grad=False)
        self._copies[size] = model
        if len(self._copies) > self.cache_size:
            self._copies.popitem(last=False)
        return model

    def train(self, mode=True):
        for model in self._copies.values():
            model.train(mode)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._copies.clear()  # moved or cast: copies are made again from the backbone
        return super()._apply(fn, *args, **kwargs)


def _sharing_copy(module):
    """A copy of ``module`` whose parameters and buffers are ``module``'s own tensors: its
    submodules are new objects, so assigning a parameter or buffer of the copy (as
    ``set_input_size`` does) leaves ``module`` as it is."""
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo=shared)


def _window_attentions(swin):
    return [block.attn for stage in swin.layers for block in stage.blocks]
