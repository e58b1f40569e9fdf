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


def build_linear_transform(config, is_train: bool) -> T.Compose:
    """The single-view transform of linear evaluation / fine-tuning; PIL image -> ``[3, IMG_SIZE, IMG_SIZE]``.

    Training: with ``AUG.SSL_LINEAR_AUG`` a random-resized crop and a horizontal flip
    (the protocol of MoCo/BYOL linear evaluation), otherwise timm's supervised recipe
    ``create_transform(IMG_SIZE, is_training=True)`` with timm's default arguments
    (colour jitter 0.4, no auto-augment, no random erasing) except the interpolation,
    which follows ``DATA.INTERPOLATION`` like every other resize here.
    Test: with ``TEST.CROP`` resize the short side to ``int(IMG_SIZE / 0.875)`` and
    centre-crop (256 -> 224), otherwise resize straight to ``IMG_SIZE x IMG_SIZE``.
    Every image is first converted to RGB. Normalised with the ImageNet mean and std.
    """
    img_size = config.DATA.IMG_SIZE
    if config.DATA.INTERPOLATION not in INTERPOLATIONS:
        raise ValueError(
            f"unknown DATA.INTERPOLATION {config.DATA.INTERPOLATION!r}; valid: {', '.join(INTERPOLATIONS)}"
        )
    interpolation = INTERPOLATIONS[config.DATA.INTERPOLATION]
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
        resize = [T.Resize(int(img_size / 0.875), interpolation=interpolation), T.CenterCrop(img_size)]
    else:
        resize = [T.Resize((img_size, img_size), interpolation=interpolation)]
    return T.Compose([ToRGB(), *resize, *normalize])
