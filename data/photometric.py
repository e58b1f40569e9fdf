"""Photometric half of the two-view augmentation, batched with per-sample parameters.

``apply_photometric(x, params)`` runs, on ``x`` [N, 3, H, W] float in [0, 1] and on its
device, what each sample's parameter vector (drawn by ``data.augment.sample_view``) asks
for, in the original recipe's order:

    horizontal flip -> colour jitter (brightness, contrast, saturation, hue in the
    sample's random order) -> grayscale -> Gaussian blur -> solarize

The operations follow torchvision's definitions (ColorJitter's blends with black, the
mean gray and the per-pixel gray; the hue shift of HSV; ITU-R 601 luma for grayscale;
solarize inverting values >= 128 / 255). The blur is the discrete Gaussian of variance
sigma^2 (radius 3 sigma, edges replicated); PIL's ``GaussianBlur`` used by the original
approximates the same one with three extended boxes of the same total variance.

``params`` stays on the host: which samples an operation touches is decided there, so
the batch is never synchronised with the device, and each sample goes through exactly
the operations it drew. The same code serves the data-loader workers (two views of one
image on the CPU) and, with ``DATA.GPU_AUG``, the whole batch on the training device.
"""

import math

import torch
import torch.nn.functional as F
from scipy import special

# Layout of a view's parameter vector (float32, NUM_PARAMS values).
FLIP = 0  # 1: mirror left-right
JITTER = 1  # 1: colour jitter applied
ORDER = slice(2, 6)  # the four jitter operations in the order applied (indices into JITTER_FACTORS)
JITTER_FACTORS = slice(6, 10)  # brightness, contrast, saturation factors; hue shift in turns
GRAY = 10  # 1: grayscale
BLUR_SIGMA = 11  # Gaussian blur sigma in pixels; 0: no blur
SOLARIZE = 12  # 1: solarize
NUM_PARAMS = 13
IDENTITY_JITTER = (1.0, 1.0, 1.0, 0.0)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)
SOLARIZE_THRESHOLD = 127.5 / 255  # uint8 values >= 128 are inverted


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of ``x`` [N, 3, H, W] -> [N, 1, H, W]."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black: ``factor * x``. factor [N]."""
    return (x * _per_sample(factor)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean gray. factor [N]."""
    r, g, b = x.mean(dim=(2, 3)).unbind(1)  # [N] each
    mean = LUMA[0] * r + LUMA[1] * g + LUMA[2] * b  # the mean gray, from the channel means
    return torch.lerp(_per_sample(mean), x, _per_sample(factor)).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the per-pixel gray. factor [N]."""
    return torch.lerp(grayscale(x), x, _per_sample(factor)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` [N] turns; value and saturation are kept."""
    r, g, b = x.unbind(1)  # [N, H, W] each
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    safe = chroma.clamp_min(1e-12)  # gray pixels: any hue, the result is the value
    hue = torch.where(
        value == r, (g - b) / safe, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )  # sextants, in [-1, 5]
    hue = hue + (_per_sample(shift).squeeze(1) * 6 + 6)  # > 0: |shift| <= 1/2 turn
    # HSV -> RGB: channel c = value - chroma * clamp(min(k, 4 - k), 0, 1), k = (offset_c + hue) mod 6
    offsets = 5 - 2 * torch.arange(3, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # R, G, B: 5, 3, 1
    k = offsets + hue.unsqueeze(1)
    k = k - 6 * torch.floor(k / 6)  # torch.remainder is several times slower on the CPU
    return value.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Discrete Gaussian kernels ``exp(-s^2) I_n(s^2)``, n = -radius..radius, for ``sigma`` [N]
    (host): [N, 2 radius + 1]. Their variance is sigma^2 (less the truncated tails) even for
    sigma < 1, as that of PIL's extended-box blur, where sampling exp(-n^2 / 2 sigma^2) gives far less."""
    variance = sigma.double().view(-1, 1) ** 2
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64).abs()
    kernel = torch.from_numpy(special.ive(taps.numpy(), variance.numpy()))  # [N, K]
    return (kernel / kernel.sum(dim=1, keepdim=True)).float()


def blur_radius(sigma: float) -> int:
    """3 sigma, and at least 2 taps aside: below sigma 0.7 the second tap still matters."""
    return max(2, math.ceil(3 * sigma))


def gaussian_blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable blur of ``x`` [N, C, H, W] with one symmetric kernel [N, K] per sample (on x's device; edges
    replicated): a sum of K shifted copies per direction, faster than a depthwise
    convolution on the CPU for these small kernels."""
    h, w = x.shape[-2:]
    taps = kernel.shape[1]
    radius = taps // 2
    kernel = kernel.to(x.dtype).view(-1, 1, 1, 1, taps)  # on x's device
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")  # [N, C, H + 2r, W + 2r]
    rows = padded[..., 0:h, :] * kernel[..., 0]
    for i in range(1, taps):
        rows.addcmul_(padded[..., i : i + h, :], kernel[..., i])
    out = rows[..., 0:w] * kernel[..., 0]
    for i in range(1, taps):
        out.addcmul_(rows[..., i : i + w], kernel[..., i])
    return out


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without synchronising: CUDA copies it from pinned memory."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _on_rows(x: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, fn) -> torch.Tensor:
    """``x[rows] = fn(x[rows], index)`` (in place when a subset), for the host index tensor
    ``rows`` and its copy ``index`` on x's device."""
    if rows.numel() == 0:
        return x
    if rows.numel() == x.shape[0]:
        return fn(x, index)
    first, last = int(rows[0]), int(rows[-1])
    if last - first + 1 == rows.numel():  # a contiguous block: a view, no gather
        x[first : last + 1] = fn(x[first : last + 1], index)
        return x
    return x.index_copy_(0, index, fn(x.index_select(0, index), index))


def apply_photometric(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Flip, colour jitter, grayscale, blur and solarize ``x`` [N, 3, H, W] in [0, 1] as
    ``params`` [N, NUM_PARAMS] (on the host) says; returns [N, 3, H, W] in [0, 1].
    ``x`` is consumed: it may be overwritten."""
    params = params.cpu()
    device = x.device
    factors = _to_device(params[:, JITTER_FACTORS], device)  # [N, 4]
    jittered = params[:, JITTER] > 0
    order = params[:, ORDER].long()
    sigma = params[params[:, BLUR_SIGMA] > 0, BLUR_SIGMA]  # of the blurred samples, in order
    kernels = _to_device(gaussian_kernels(sigma, blur_radius(float(sigma.max()))), device) if sigma.numel() else None

    # (samples, operation) in the order applied; which samples is decided on the host
    steps = [(params[:, FLIP] > 0, lambda v, _: v.flip(-1))]
    for position in range(4):
        for i, op in enumerate(JITTER_OPS):
            steps.append((jittered & (order[:, position] == i), lambda v, index, op=op, i=i: op(v, factors[index, i])))
    steps += [
        (params[:, GRAY] > 0, lambda v, _: grayscale(v).expand(-1, 3, -1, -1).contiguous()),
        (params[:, BLUR_SIGMA] > 0, lambda v, _: gaussian_blur(v, kernels)),
        (params[:, SOLARIZE] > 0, lambda v, _: torch.where(v >= SOLARIZE_THRESHOLD, 1 - v, v)),
    ]
    rows = [mask.nonzero().flatten() for mask, _ in steps]
    indices = _to_device(torch.cat(rows), device).split([len(r) for r in rows])  # one copy for all
    for (_, fn), host_rows, index in zip(steps, rows, indices, strict=True):
        x = _on_rows(x, host_rows, index, fn)
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8, rounded to nearest."""
    return x.mul(255).add_(0.5).to(torch.uint8)  # values in [0.5, 255.5): truncation rounds


class DeviceAugment:
    """The augmentation done on the training device: views ``uint8 [B, 3, H, W]`` and
    their parameters [B, NUM_PARAMS] -> float [B, 3, H, W] normalised with the ImageNet
    mean and std. With ``gpu_aug`` the photometric operations are applied first; the
    device is the images' own."""

    def __init__(self, gpu_aug: bool):
        self.gpu_aug = gpu_aug
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _scale_shift(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(1 / (255 std), 1 / std, -mean / std): normalised = uint8 value * the first + the
        last = value in [0, 1] * the second + the last."""
        if device not in self._stats:
            std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
            mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
            self._stats[device] = (1 / (255 * std), 1 / std, -mean / std)
        return self._stats[device]

    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        per_level, per_unit, shift = self._scale_shift(images.device)
        if self.gpu_aug:
            x = apply_photometric(images.float().div_(255), params)
            return torch.addcmul(shift, x, per_unit)
        return torch.addcmul(shift, images.float(), per_level)


class DeviceViews:
    """The pretraining loader's batches as the model's two inputs and the labels on ``device``:
    ``(x1, x2, targets)``, normalised float [B, 3, H, W] made by ``augment`` (a ``DeviceAugment``),
    and int64 [B] (what the online linear monitor trains on)."""

    def __init__(self, data_loader, augment: DeviceAugment, device: torch.device):
        self.data_loader = data_loader
        self.augment = augment
        self.device = device

    def __len__(self) -> int:
        return len(self.data_loader)

    def __iter__(self):
        for (views, params), targets in self.data_loader:
            x1, x2 = (self.augment(v.to(self.device, non_blocking=True), p) for v, p in zip(views, params, strict=True))
            yield x1, x2, targets.to(self.device, non_blocking=True)
