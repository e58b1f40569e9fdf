"""Two-view augmentations for self-supervised pretraining.

'byol' is the asymmetric pair of BYOL (Grill et al., 2020, table 6): view 1 is always
blurred and never solarized, view 2 is blurred with p=0.1 and solarized with p=0.2.
'simclr' is SimCLR's symmetric pair (stronger color jitter, blur p=0.5, no solarize).

Every random draw of these transforms comes from torch's global generator; the data
loader (``data/build.py``) seeds it per sample so augmentations are reproducible.
"""

from collections.abc import Callable

from timm.data import create_transform
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from data.cached_image_folder import _to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}
SSL_AUG_TYPES = ("byol", "simclr")


class TwoViewTransform:
    """Apply two transforms to one image: ``img -> (t1(img), t2(img))``."""

    def __init__(self, t1: Callable, t2: Callable):
        self.t1 = t1
        self.t2 = t2

    def __call__(self, img):
        return self.t1(img), self.t2(img)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(\nt1={self.t1},\nt2={self.t2})"


def blur_kernel_size(img_size: int) -> int:
    """About 10% of the image side, odd, at least 3 (23 for 224)."""
    return max(3, int(0.1 * img_size) // 2 * 2 + 1)


def _view(
    img_size: int,
    crop_min: float,
    interpolation: InterpolationMode,
    jitter: tuple[float, float, float, float],
    blur_p: float,
    solarize_p: float | None,
) -> T.Compose:
    ops = [
        T.RandomResizedCrop(img_size, scale=(crop_min, 1.0), interpolation=interpolation),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(*jitter)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(blur_kernel_size(img_size), sigma=(0.1, 2.0))], p=blur_p),
    ]
    if solarize_p is not None:
        ops.append(T.RandomSolarize(threshold=128, p=solarize_p))
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


def build_ssl_transform(config) -> TwoViewTransform:
    """The two-view transform named by ``config.AUG.SSL_AUG_TYPE``.

    Reads DATA.IMG_SIZE, DATA.INTERPOLATION, AUG.SSL_AUG_TYPE and AUG.SSL_AUG_CROP.
    """
    aug_type = config.AUG.SSL_AUG_TYPE
    if config.DATA.INTERPOLATION not in INTERPOLATIONS:
        raise ValueError(
            f"unknown DATA.INTERPOLATION {config.DATA.INTERPOLATION!r}; valid: {', '.join(INTERPOLATIONS)}"
        )
    common = dict(
        img_size=config.DATA.IMG_SIZE,
        crop_min=config.AUG.SSL_AUG_CROP,
        interpolation=INTERPOLATIONS[config.DATA.INTERPOLATION],
    )
    if aug_type == "byol":
        jitter = (0.4, 0.4, 0.2, 0.1)
        return TwoViewTransform(
            _view(**common, jitter=jitter, blur_p=1.0, solarize_p=0.0),
            _view(**common, jitter=jitter, blur_p=0.1, solarize_p=0.2),
        )
    if aug_type == "simclr":
        jitter = (0.8, 0.8, 0.8, 0.2)
        return TwoViewTransform(
            _view(**common, jitter=jitter, blur_p=0.5, solarize_p=None),
            _view(**common, jitter=jitter, blur_p=0.5, solarize_p=None),
        )
    raise ValueError(f"unknown AUG.SSL_AUG_TYPE {aug_type!r}; valid: {', '.join(SSL_AUG_TYPES)}")


# -----------------------------------------------------------------------------
# Linear evaluation / fine-tuning (main_linear.py)
# -----------------------------------------------------------------------------
# Unlike the two-view transforms, these are not seeded per sample: timm's crop draws
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
