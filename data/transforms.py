"""Single-view transforms of linear evaluation, fine-tuning and k-NN.

The two-view pretraining augmentation is in ``data/augment.py`` and ``data/photometric.py``.
"""

from timm.data import create_transform
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from data.cached_image_folder import _to_rgb
from data.photometric import IMAGENET_MEAN, IMAGENET_STD

INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


# -----------------------------------------------------------------------------
# Linear evaluation / fine-tuning (main_linear.py)
# -----------------------------------------------------------------------------
# Unlike the two-view augmentation, these are not seeded per sample: timm's crop draws
# from Python's ``random``, and linear evaluation needs no bit-exact resume.
class ToRGB:
    """Convert any ``PIL.Image`` (L, P, CMYK, RGBA, 16-bit, ...) to RGB, like ``pil_rgb_loader``."""

    def __call__(self, img):
        return _to_rgb(img)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"


def _interpolation(config, key: str) -> InterpolationMode:
    """The resampling named by the config key ``key`` ("SECTION.NAME"); ValueError naming the valid ones."""
    section, name = key.split(".")
    value = config[section][name]
    if value not in INTERPOLATIONS:
        raise ValueError(f"unknown {key} {value!r}; valid: {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[value]


def build_linear_transform(config, is_train: bool) -> T.Compose:
    """The single-view transform of linear evaluation / fine-tuning; PIL image -> ``[3, IMG_SIZE, IMG_SIZE]``.

    With ``AUG.SSL_LINEAR_AUG`` (the default) the original's, resampled as ``AUG.SSL_AUG_INTERPOLATION``
    (bilinear, torchvision's default, which the original used):
    training a random-resized crop and a horizontal flip; test a resize of the short side to
    ``IMG_SIZE + 32`` and a centre crop (256 -> 224).
    Otherwise timm's supervised recipe, resampled as ``DATA.INTERPOLATION``: training
    ``create_transform(IMG_SIZE, is_training=True)`` with timm's default arguments (colour
    jitter 0.4, no auto-augment, no random erasing); test a resize to ``int(IMG_SIZE / 0.875)``
    and a centre crop (256 -> 224).
    ``TEST.CROP`` False resizes test images straight to ``IMG_SIZE x IMG_SIZE`` instead.
    Every image is first converted to RGB. Normalised with the ImageNet mean and std.
    """
    img_size = config.DATA.IMG_SIZE
    if config.AUG.SSL_LINEAR_AUG:
        interpolation = _interpolation(config, "AUG.SSL_AUG_INTERPOLATION")
        test_resize = img_size + 32
    else:
        interpolation = _interpolation(config, "DATA.INTERPOLATION")
        test_resize = int(img_size / 0.875)
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if is_train:
        if not config.AUG.SSL_LINEAR_AUG:
            supervised = create_transform(
                img_size,
                is_training=True,
                interpolation=config.DATA.INTERPOLATION,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
            )
            return T.Compose([ToRGB(), supervised])
        return T.Compose(
            [
                ToRGB(),
                T.RandomResizedCrop(img_size, interpolation=interpolation),
                T.RandomHorizontalFlip(),
                *normalize,
            ]
        )
    if config.TEST.CROP:
        resize = [T.Resize(test_resize, interpolation=interpolation), T.CenterCrop(img_size)]
    else:
        resize = [T.Resize((img_size, img_size), interpolation=interpolation)]
    return T.Compose([ToRGB(), *resize, *normalize])
