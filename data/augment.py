"""Two-view self-supervised augmentation: the recipes, their random parameters, and the
cheap geometric half that runs in the data-loader workers.

Each view is the torchvision recipe of the original code

    RandomResizedCrop(IMG_SIZE, scale) -> RandomHorizontalFlip -> RandomApply(ColorJitter, p)
    -> RandomGrayscale(p) -> RandomApply(GaussianBlur(sigma ~ U[0.1, 2.0]), p)
    -> RandomApply(solarize, p) -> ToTensor -> Normalize

split in two halves with the same laws:

* here, in the worker: every random parameter of both views is drawn first, in the
  order and with the draws of torchvision's v1 transforms (``sample_view``); the JPEG
  is then decoded only as large as the two crops need (``Image.draft``: the largest
  DCT reduction that still leaves each crop at least IMG_SIZE pixels wide and high),
  and each crop is resized straight from the decoded image to ``[3, S, S]`` uint8;
* in ``data/photometric.py``: flip, colour jitter, grayscale, blur and solarize, batched
  with per-sample parameters. They run in the worker too (the default), or on the
  training device with ``DATA.GPU_AUG``, where workers only decode, crop and resize.

Normalisation always happens on the training device (``DeviceAugment``), so the
loader moves uint8 images: a quarter of the bytes of float32.

Recipes ('byol' and 'simclr', ``AUG.SSL_AUG_TYPE``), as the original code ran them:

* byol:   both views jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2; view 1 blur
          p=1.0 and no solarize, view 2 blur p=0.1 and solarize p=0.2 (BYOL, table 6);
          crop scale (AUG.SSL_AUG_CROP, 1).
* simclr: despite its name, MoCo v2's symmetric recipe: crop scale (0.2, 1), jitter
          (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, blur p=0.5, no solarize.

Every draw comes from torch's global generator, which the data loader seeds per sample
(``data/build.py``), so a view is a pure function of (SEED, epoch, rank, index).
"""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from config import SSL_AUG_TYPES
from data.cached_image_folder import _to_rgb
from data.photometric import (
    BLUR_SIGMA,
    FLIP,
    GRAY,
    IDENTITY_JITTER,
    JITTER,
    JITTER_FACTORS,
    NUM_PARAMS,
    ORDER,
    SOLARIZE,
    apply_photometric,
    to_uint8,
)

RESAMPLE = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class ViewRecipe:
    """The random operations of one view and their laws."""

    crop_scale: tuple[float, float]
    jitter: tuple[float, float, float, float]  # brightness, contrast, saturation, hue strengths
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float | None = None  # None: no solarize step (and no random draw for it)
    flip_p: float = 0.5
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def jitter_ranges(self) -> list[tuple[float, float]]:
        """ColorJitter's factor ranges: [1 - s, 1 + s] (floored at 0) for the first three, [-h, h] for hue."""
        b, c, s, h = self.jitter
        return [(max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h)]


def build_recipes(aug_type: str, crop_min: float, blur: bool = True) -> tuple[ViewRecipe, ViewRecipe]:
    """The two views of ``AUG.SSL_AUG_TYPE``; ``crop_min`` (AUG.SSL_AUG_CROP) is byol's crop lower
    bound; ``blur`` False (AUG.SSL_AUG_BLUR) never blurs, as small-image recipes do (a blur
    probability of 0: its draw stays, as torchvision's RandomApply(p=0) draws)."""
    if aug_type == "byol":
        jitter = (0.4, 0.4, 0.2, 0.1)
        views = (
            ViewRecipe((crop_min, 1.0), jitter, blur_p=1.0),
            ViewRecipe((crop_min, 1.0), jitter, blur_p=0.1, solarize_p=0.2),
        )
    elif aug_type == "simclr":
        view = ViewRecipe((0.2, 1.0), (0.4, 0.4, 0.4, 0.1), blur_p=0.5)
        views = (view, view)
    else:
        raise ValueError(f"unknown AUG.SSL_AUG_TYPE {aug_type!r}; valid: {', '.join(SSL_AUG_TYPES)}")
    return views if blur else tuple(dataclasses.replace(view, blur_p=0.0) for view in views)


def config_recipes(config) -> tuple[ViewRecipe, ViewRecipe]:
    """``build_recipes`` of the config's AUG.SSL_AUG_TYPE, AUG.SSL_AUG_CROP and AUG.SSL_AUG_BLUR."""
    return build_recipes(config.AUG.SSL_AUG_TYPE, config.AUG.SSL_AUG_CROP, config.AUG.SSL_AUG_BLUR)


# -----------------------------------------------------------------------------
# Random parameters, drawn as torchvision's v1 transforms draw them
# -----------------------------------------------------------------------------
def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high))


def _applied(p: float) -> bool:
    """RandomApply's test: applied unless ``p < U[0, 1)``."""
    return not p < float(torch.rand(1))


def sample_crop(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]):
    """RandomResizedCrop's box ``(top, left, height, width)`` on a ``width x height`` image."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(*scale)
        aspect = math.exp(_uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)))
            left = int(torch.randint(0, width - w + 1, size=(1,)))
            return top, left, h, w
    # fallback: the largest central crop within the ratio range
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view(recipe: ViewRecipe, width: int, height: int) -> tuple[tuple[int, int, int, int], torch.Tensor]:
    """One view's crop box ``(top, left, height, width)`` and photometric parameters ``[NUM_PARAMS]``."""
    crop = sample_crop(width, height, recipe.crop_scale, recipe.crop_ratio)
    params = torch.zeros(NUM_PARAMS)
    params[ORDER] = torch.arange(4, dtype=torch.float32)
    params[JITTER_FACTORS] = torch.tensor(IDENTITY_JITTER)
    params[FLIP] = float(torch.rand(1) < recipe.flip_p)
    if _applied(recipe.jitter_p):
        params[JITTER] = 1.0
        params[ORDER] = torch.randperm(4).float()
        params[JITTER_FACTORS] = torch.tensor([_uniform(*r) for r in recipe.jitter_ranges()])
    params[GRAY] = float(torch.rand(1) < recipe.gray_p)
    if _applied(recipe.blur_p):
        params[BLUR_SIGMA] = _uniform(*recipe.blur_sigma)
    if recipe.solarize_p is not None:
        params[SOLARIZE] = float(_applied(recipe.solarize_p))
    return crop, params


# -----------------------------------------------------------------------------
# Decoding and cropping
# -----------------------------------------------------------------------------
def draft_for_crops(img: Image.Image, crops: list[tuple[int, int, int, int]], size: int) -> float:
    """Set a JPEG ``img`` (opened, not yet loaded) to decode at the largest DCT reduction
    (1/2, 1/4, 1/8) that leaves every crop box at least ``size`` pixels wide and high, so
    no crop is upsampled more than from the full image. Returns the reduction (1 if none)."""
    if img.format != "JPEG":
        return 1.0
    full_w, full_h = img.size
    min_h = min(c[2] for c in crops)
    min_w = min(c[3] for c in crops)
    # draft keeps each side >= the requested one, so crop side / reduction >= size
    drafted = img.draft("RGB", (math.ceil(full_w * size / min_w), math.ceil(full_h * size / min_h)))
    return full_w / drafted[1][2] if drafted is not None else 1.0


def decode_crops(
    img: Image.Image, crops: list[tuple[int, int, int, int]], size: int, resample: InterpolationMode
) -> torch.Tensor:
    """Decode ``img`` (opened, not yet loaded; see ``draft_for_crops``) and resize each crop
    box ``(top, left, height, width)`` to ``size x size``: [len(crops), 3, size, size] uint8.

    The resize is torchvision's antialiased one on uint8 channels-last tensors (the same
    filters as PIL's, about 3x faster). On a reduced decoding the box edges are rounded
    to its pixels."""
    scale = draft_for_crops(img, crops, size)
    img.load()
    pixels = torch.from_numpy(np.array(_to_rgb(img))).permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W], channels last
    views = []
    for top, left, h, w in crops:
        y0, x0, y1, x1 = (round(v / scale) for v in (top, left, top + h, left + w))
        views.append(TF.resize(pixels[:, :, y0:y1, x0:x1], [size, size], interpolation=resample, antialias=True))
    return torch.cat(views).contiguous()


class TwoViewAugment:
    """The pretraining transform: an opened image -> ``((view1, view2), (params1, params2))``.

    Views are ``[3, S, S]`` uint8. Without ``gpu_aug`` the photometric operations are
    already applied and the parameters are only a record of them; with it they are
    still to be applied (``DeviceAugment``).
    """

    def __init__(
        self, recipes: tuple[ViewRecipe, ViewRecipe], img_size: int, resample: InterpolationMode, gpu_aug: bool
    ):
        self.recipes = recipes
        self.img_size = img_size
        self.resample = resample
        self.gpu_aug = gpu_aug

    def __call__(self, img: Image.Image):
        width, height = img.size
        crops, params = zip(*(sample_view(recipe, width, height) for recipe in self.recipes), strict=True)
        views = decode_crops(img, list(crops), self.img_size, self.resample)  # [2, 3, S, S]
        params = torch.stack(params)  # [2, NUM_PARAMS]
        if not self.gpu_aug:
            views = to_uint8(apply_photometric(views.float().div_(255), params))
        return tuple(views.unbind(0)), tuple(params.unbind(0))

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(img_size={self.img_size}, gpu_aug={self.gpu_aug},\n"
            f"view1={self.recipes[0]},\nview2={self.recipes[1]})"
        )


def build_ssl_transform(config) -> TwoViewAugment:
    """The two-view transform of AUG.SSL_AUG_TYPE at DATA.IMG_SIZE (see the module docstring)."""
    if config.AUG.SSL_AUG_INTERPOLATION not in RESAMPLE:
        raise ValueError(
            f"unknown AUG.SSL_AUG_INTERPOLATION {config.AUG.SSL_AUG_INTERPOLATION!r}; valid: {', '.join(RESAMPLE)}"
        )
    return TwoViewAugment(
        config_recipes(config),
        config.DATA.IMG_SIZE,
        RESAMPLE[config.AUG.SSL_AUG_INTERPOLATION],
        config.DATA.GPU_AUG,
    )


def synthetic_views(config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two views of random uint8 pixels with parameters drawn from the config's recipes (for
    500 x 375 images), for timing steps without data: ``[(images [B, 3, S, S], params [B, P])] * 2``."""
    size, batch = config.DATA.IMG_SIZE, config.DATA.BATCH_SIZE
    views = []
    for recipe in config_recipes(config):
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        views.append((images, torch.stack([sample_view(recipe, 500, 375)[1] for _ in range(batch)])))
    return views
