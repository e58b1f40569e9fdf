"""The two-view augmentation draws from the same laws as the original recipe.

The reference is the original code's torchvision v1 pipeline, written here as it had
it (RandomResizedCrop, flip, RandomApply(ColorJitter), RandomGrayscale, PIL's
GaussianBlur with sigma ~ U[0.1, 2.0], ImageOps.solarize). Parameters are compared with
torchvision's own samplers, and whole views through statistics of the images, with
two-sample tests (fixed seeds, so the outcome is deterministic). The same comparisons
are shown to reject pipelines that skip an operation, and the GPU-augmentation path
(photometric operations batched after the workers) is checked against the default
path image for image.
"""

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from data.augment import TwoViewAugment, build_recipes, sample_crop, sample_view
from data.photometric import (
    BLUR_SIGMA,
    FLIP,
    GRAY,
    JITTER,
    JITTER_FACTORS,
    ORDER,
    SOLARIZE,
    apply_photometric,
    blur_radius,
    gaussian_blur,
    gaussian_kernels,
    to_uint8,
)

ALPHA = 1e-3  # two-sample tests: same law unless p < ALPHA
SIZE = 32  # output side of the views
DRAWS = 60  # views per image and pipeline
SOURCE = (96, 72)  # width, height of the source JPEGs: crops >= 64 px are decoded at 1/2


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like image: smooth colour regions with some texture."""
    coarse = rng.integers(0, 256, (height // 12 + 2, width // 12 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels = smooth + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    rng = np.random.default_rng(0)
    files = []
    for _ in range(8):
        buffer = io.BytesIO()
        photo(rng, *SOURCE).save(buffer, "JPEG", quality=92)
        files.append(buffer.getvalue())
    return files


class PILGaussianBlur:
    """The original's blur: PIL's GaussianBlur with sigma ~ U[0.1, 2.0]."""

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(1).uniform_(0.1, 2.0))))


def reference_views(aug_type: str, crop_min: float = 0.08) -> tuple[T.Compose, T.Compose]:
    """The original's two views (without ToTensor's normalisation: statistics are taken in [0, 1])."""
    if aug_type == "byol":

        def view(blur_p, solarize_p):
            ops = [
                T.RandomResizedCrop(SIZE, scale=(crop_min, 1.0)),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.RandomApply([PILGaussianBlur()], p=blur_p),
            ]
            if solarize_p:
                ops.append(T.RandomApply([ImageOps.solarize], p=solarize_p))
            return T.Compose([*ops, T.ToTensor()])

        return view(1.0, 0.0), view(0.1, 0.2)
    moco_v2 = T.Compose(
        [
            T.RandomResizedCrop(SIZE, scale=(0.2, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([PILGaussianBlur()], p=0.5),
            T.ToTensor(),
        ]
    )
    return moco_v2, moco_v2


def run_reference(jpegs, aug_type, seed):
    torch.manual_seed(seed)
    view1, view2 = reference_views(aug_type)
    out = ([], [])
    for data in jpegs:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        for _ in range(DRAWS):
            out[0].append(view1(img))
            out[1].append(view2(img))
    return torch.stack(out[0]), torch.stack(out[1])


def run_project(jpegs, recipes, seed, gpu_aug=False):
    """Views of the project's pipeline in [0, 1]; with ``gpu_aug`` the photometric half runs
    batched over all samples afterwards, as on the training device."""
    torch.manual_seed(seed)
    transform = TwoViewAugment(recipes, SIZE, InterpolationMode.BILINEAR, gpu_aug=gpu_aug)
    views, params = ([], []), ([], [])
    for data in jpegs:
        for _ in range(DRAWS):
            (v1, v2), (p1, p2) = transform(Image.open(io.BytesIO(data)))
            views[0].append(v1), views[1].append(v2), params[0].append(p1), params[1].append(p2)
    out = []
    for v, p in zip(views, params, strict=True):
        x = torch.stack(v).float() / 255
        if gpu_aug:
            x = apply_photometric(x, torch.stack(p))
        out.append(x)
    return out[0], out[1], torch.stack(params[0]), torch.stack(params[1])


def image_statistics(x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image statistics of views [N, 3, H, W] in [0, 1]."""
    chroma = x.amax(1) - x.amin(1)
    found = {f"mean{c}": x[:, c].mean((1, 2)) for c in range(3)}
    found.update({f"std{c}": x[:, c].std((1, 2)) for c in range(3)})
    found["sharpness"] = (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))
    found["chroma"] = chroma.mean((1, 2))
    found["bright_share"] = (x > 0.8).float().mean((1, 2, 3))
    return {name: value.numpy() for name, value in found.items()}


def smallest_p(a: torch.Tensor, b: torch.Tensor) -> tuple[float, str]:
    sa, sb = image_statistics(a), image_statistics(b)
    return min((stats.ks_2samp(sa[k], sb[k]).pvalue, k) for k in sa)


@pytest.fixture(scope="module")
def reference(jpegs):
    return run_reference(jpegs, "byol", seed=1)


@pytest.fixture(scope="module")
def project(jpegs):
    return run_project(jpegs, build_recipes("byol", 0.08), seed=2)


# ----------------------------------------------------------------------------
# Parameter laws
# ----------------------------------------------------------------------------
def test_crop_box_law_matches_random_resized_crop():
    img = Image.new("RGB", (500, 375))
    torch.manual_seed(3)
    ours = np.array([sample_crop(500, 375, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(3000)], dtype=float)
    torch.manual_seed(4)
    theirs = np.array([T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)], float)
    for name, f in {
        "scale": lambda c: c[:, 2] * c[:, 3] / (500 * 375),
        "log aspect": lambda c: np.log(c[:, 3] / c[:, 2]),
        "centre x": lambda c: c[:, 1] + c[:, 3] / 2,
        "centre y": lambda c: c[:, 0] + c[:, 2] / 2,
    }.items():
        assert stats.ks_2samp(f(ours), f(theirs)).pvalue > ALPHA, name
    # the fallback when no draw fits: the central crop within the ratio range
    torch.manual_seed(0)
    assert sample_crop(10, 1000, (0.99, 1.0), (3 / 4, 4 / 3)) == (493, 0, 13, 10)


@pytest.mark.parametrize("aug_type", ["byol", "simclr"])
def test_photometric_parameter_laws(aug_type):
    recipes = build_recipes(aug_type, 0.08)
    reference = reference_views(aug_type)
    torch.manual_seed(5)
    n = 4000
    for recipe, compose in zip(recipes, reference, strict=True):
        params = torch.stack([sample_view(recipe, 500, 375)[1] for _ in range(n)]).numpy()
        ops = {type(op).__name__: op for op in compose.transforms}
        applies = [op for op in compose.transforms if isinstance(op, T.RandomApply)]
        jitter_p = next(op.p for op in applies if isinstance(op.transforms[0], T.ColorJitter))
        blur_p = next(op.p for op in applies if isinstance(op.transforms[0], PILGaussianBlur))
        solarize_p = next((op.p for op in applies if op.transforms[0] is ImageOps.solarize), 0.0)
        rates = {
            FLIP: ops["RandomHorizontalFlip"].p,
            JITTER: jitter_p,
            GRAY: ops["RandomGrayscale"].p,
            BLUR_SIGMA: blur_p,
            SOLARIZE: solarize_p,
        }
        for column, p in rates.items():
            hits = int((params[:, column] > 0).sum())
            assert stats.binomtest(hits, n, p).pvalue > ALPHA if 0 < p < 1 else hits == n * p, column

        # jitter factors against torchvision's own sampler, order uniform over the 4! permutations
        jitter = next(op.transforms[0] for op in applies if isinstance(op.transforms[0], T.ColorJitter))
        jittered = params[params[:, JITTER] > 0]
        torch.manual_seed(6)
        theirs = [
            T.ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
            for _ in range(len(jittered))
        ]
        their_factors = np.array([t[1:] for t in theirs], dtype=float)
        for k in range(4):
            assert stats.ks_2samp(jittered[:, JITTER_FACTORS][:, k], their_factors[:, k]).pvalue > ALPHA, k
        orders = [tuple(o) for o in jittered[:, ORDER].astype(int)]
        counts = np.array([orders.count(perm) for perm in set(orders)])
        assert len(counts) == 24 and stats.chisquare(counts).pvalue > ALPHA
        # unjittered views carry the identity factors
        assert np.allclose(params[params[:, JITTER] == 0][:, JITTER_FACTORS], [1, 1, 1, 0])

        sigma = params[params[:, BLUR_SIGMA] > 0, BLUR_SIGMA]
        original = np.random.default_rng(7).uniform(0.1, 2.0, len(sigma))  # the original's draw
        assert stats.ks_2samp(sigma, original).pvalue > ALPHA


@pytest.mark.parametrize("sigma", [0.1, 0.3, 1.0, 2.0])
def test_blur_has_the_pil_blurs_width(sigma):
    """Both blurs spread an impulse with variance sigma^2 (PIL's three boxes only approximate it)."""
    impulse = np.zeros((41, 41), dtype=np.uint8)
    impulse[20, 20] = 255
    offsets = np.arange(41) - 20

    def variance(blurred: np.ndarray) -> float:
        profile = blurred.sum(axis=0) / blurred.sum()
        return float((profile * offsets**2).sum())

    pil = np.asarray(Image.fromarray(impulse).filter(ImageFilter.GaussianBlur(radius=sigma)), dtype=float)
    x = torch.from_numpy(impulse).float().view(1, 1, 41, 41)
    ours = gaussian_blur(x, gaussian_kernels(torch.tensor([sigma]), blur_radius(sigma)))[0, 0].numpy()
    assert ours.sum() == pytest.approx(255, rel=1e-5)  # normalised kernel
    assert variance(ours) == pytest.approx(sigma**2, rel=0.05)
    if sigma >= 0.3:  # below, PIL's 8-bit output rounds the spread away
        assert variance(ours) == pytest.approx(variance(pil), rel=0.1)


# ----------------------------------------------------------------------------
# Whole views
# ----------------------------------------------------------------------------
def test_views_have_the_reference_image_statistics(reference, project):
    for ours, theirs in zip(project[:2], reference, strict=True):
        p, name = smallest_p(ours, theirs)
        assert p > ALPHA, f"{name}: p = {p:.2e}"


@pytest.mark.parametrize(
    "skipped",
    [
        dict(blur_p=0.0),  # view 1's blur
        dict(jitter_p=0.0),
        dict(gray_p=0.0),
    ],
)
def test_the_comparison_rejects_a_pipeline_that_skips_an_operation(jpegs, reference, skipped):
    view1, view2 = build_recipes("byol", 0.08)
    broken = run_project(jpegs, (replace(view1, **skipped), view2), seed=2)
    p, name = smallest_p(broken[0], reference[0])
    assert p < ALPHA, f"skipping {skipped} went unnoticed (smallest p {p:.2e} for {name})"


def test_solarize_is_detected_on_view_2(jpegs, reference):
    view1, view2 = build_recipes("byol", 0.08)
    broken = run_project(jpegs, (view1, replace(view2, solarize_p=0.0)), seed=2)
    p, name = smallest_p(broken[1], reference[1])
    assert p < ALPHA, f"skipping solarize went unnoticed (smallest p {p:.2e} for {name})"


def test_simclr_views_have_the_reference_image_statistics(jpegs):
    theirs = run_reference(jpegs, "simclr", seed=8)
    ours = run_project(jpegs, build_recipes("simclr", 0.08), seed=9)
    p, name = smallest_p(ours[0], theirs[0])
    assert p > ALPHA, f"{name}: p = {p:.2e}"


def test_gpu_augmentation_gives_the_default_paths_views(jpegs, project):
    """Same seeds: the batched photometric half reproduces the per-image one (to uint8 rounding)."""
    batched = run_project(jpegs, build_recipes("byol", 0.08), seed=2, gpu_aug=True)
    for k in range(2):
        assert torch.equal(batched[2 + k], project[2 + k])  # the same parameters
        difference = (to_uint8(batched[k]).int() - (project[k] * 255).round().int()).abs()
        assert difference.max() <= 1
    # and the batches really mix samples with and without each operation
    for view, column in ((0, FLIP), (0, JITTER), (0, GRAY), (1, BLUR_SIGMA), (1, SOLARIZE)):
        assert 0 < (batched[2 + view][:, column] > 0).float().mean() < 1
