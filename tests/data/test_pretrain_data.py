"""The pretraining data package on tiny real image folders and zips (CPU, a few seconds)."""

import io
import os
import zipfile

import numpy as np
import pytest
import torch
from conftest import assert_same_batches, epoch_batches, make_config
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from data import build_loader, zipreader
from data.augment import (
    TwoViewAugment,
    ViewRecipe,
    build_recipes,
    build_ssl_transform,
    decode_crops,
    draft_for_crops,
    sample_view,
)
from data.build import ShardSampler, build_dataset, build_sampler, resolve_num_workers
from data.cached_image_folder import CachedImageFolder, pil_rgb_loader
from data.photometric import BLUR_SIGMA, IMAGENET_MEAN, IMAGENET_STD, NUM_PARAMS, SOLARIZE, DeviceAugment

CLASSES = ("cat", "dog", "fox")
IMAGES_PER_CLASS = 4
NUM_IMAGES = len(CLASSES) * IMAGES_PER_CLASS
HEIGHT, WIDTH = 40, 48
# (class, image) -> (PIL mode, file format) for the images that are not RGB JPEGs
SPECIAL = {
    (0, 0): ("L", "PNG"),
    (0, 1): ("P", "PNG"),
    (1, 0): ("CMYK", "JPEG"),
    (1, 1): ("I;16", "PNG"),
    (2, 0): ("RGBA", "PNG"),
}


def _make_image(rng: np.random.Generator, mode: str) -> Image.Image:
    rgb = Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (HEIGHT, WIDTH), dtype=np.uint16))
    if mode == "P":
        return rgb.quantize(colors=16)
    return rgb.convert(mode)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    """DATA_PATH holding both train/<class>/<image> and train.zip + train_map.txt."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    members = []
    for c, name in enumerate(CLASSES):
        os.makedirs(root / "train" / name)
        for i in range(IMAGES_PER_CLASS):
            mode, fmt = SPECIAL.get((c, i), ("RGB", "JPEG"))
            member = f"{name}/img{i}.{'png' if fmt == 'PNG' else 'jpg'}"
            _make_image(rng, mode).save(root / "train" / member, fmt)
            members.append((member, c))
    with zipfile.ZipFile(root / "train.zip", "w") as zf:
        for member, _ in members:
            zf.write(root / "train" / member, member)
    # ImageFolder's order (sorted classes, sorted files), so indices agree across modes
    with open(root / "train_map.txt", "w") as f:
        f.writelines(f"{member}\t{c}\n" for member, c in sorted(members))
    return str(root)


# ----------------------------------------------------------------------------
# Transforms and image loading
# ----------------------------------------------------------------------------
def test_byol_views_are_asymmetric():
    view1, view2 = build_recipes("byol", 0.08)
    for view in (view1, view2):
        assert view.crop_scale == (0.08, 1.0) and view.crop_ratio == pytest.approx((3 / 4, 4 / 3))
        assert view.flip_p == 0.5 and view.jitter_p == 0.8 and view.gray_p == 0.2
        assert np.allclose(view.jitter_ranges(), [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)])
        assert view.blur_sigma == (0.1, 2.0)
    assert (view1.blur_p, view1.solarize_p) == (1.0, None)  # the original's view 1 has no solarize step
    assert (view2.blur_p, view2.solarize_p) == (0.1, 0.2)
    assert build_recipes("byol", 0.3)[0].crop_scale == (0.3, 1.0)


@pytest.mark.parametrize("aug_type", ["byol", "simclr"])
def test_without_blur_only_the_blur_changes(aug_type):
    """AUG.SSL_AUG_BLUR False: no view is blurred; the crop, flip, jitter and grayscale drawn before
    the blur are those of the recipe with blur (per sample, as the loader seeds each)."""
    with_blur, without = build_recipes(aug_type, 0.08), build_recipes(aug_type, 0.08, blur=False)
    assert [v.blur_p for v in without] == [0.0, 0.0] and any(v.blur_p for v in with_blur)
    before_blur = [i for i in range(NUM_PARAMS) if i not in (BLUR_SIGMA, SOLARIZE)]
    blurred = 0
    for a, b in zip(with_blur, without, strict=True):
        for seed in range(50):
            torch.manual_seed(seed)
            crop_a, params_a = sample_view(a, 500, 375)
            torch.manual_seed(seed)
            crop_b, params_b = sample_view(b, 500, 375)
            assert crop_a == crop_b and torch.equal(params_a[before_blur], params_b[before_blur])
            assert params_b[BLUR_SIGMA] == 0
            blurred += bool(params_a[BLUR_SIGMA])
    assert blurred > 0
    config = make_config("unused")
    config.AUG.SSL_AUG_BLUR, config.AUG.SSL_AUG_TYPE = False, aug_type
    assert build_ssl_transform(config).recipes == without


def test_simclr_views_are_moco_v2s():
    view1, view2 = build_recipes("simclr", 0.08)
    assert view1 == view2
    assert view1.crop_scale == (0.2, 1.0)  # fixed, as the original ran it
    assert np.allclose(view1.jitter_ranges(), [(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)])
    assert (view1.jitter_p, view1.gray_p, view1.blur_p, view1.solarize_p) == (0.8, 0.2, 0.5, None)


def test_unknown_aug_type_names_the_valid_ones():
    with pytest.raises(ValueError, match="byol.*simclr"):
        build_recipes("moco", 0.08)
    cfg = make_config("unused")
    cfg.AUG.SSL_AUG_INTERPOLATION = "lanczos"
    with pytest.raises(ValueError, match="bilinear"):
        build_ssl_transform(cfg)


def test_transform_follows_the_config():
    cfg = make_config("unused")
    cfg.AUG.SSL_AUG_TYPE = "simclr"
    cfg.DATA.GPU_AUG = True
    transform = build_ssl_transform(cfg)
    assert isinstance(transform, TwoViewAugment) and isinstance(transform.recipes[0], ViewRecipe)
    assert transform.recipes == build_recipes("simclr", 0.08)
    assert transform.img_size == 32 and transform.gpu_aug and transform.resample == InterpolationMode.BILINEAR


def _photo_jpeg(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(coarse).resize((width, height), Image.BICUBIC).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_jpeg_is_decoded_only_as_large_as_the_crops_need():
    data = _photo_jpeg(512, 384)
    full = [(0, 0, 384, 512)]
    # (crops, output side) -> DCT reduction: each crop side / reduction stays >= the output side
    cases = [(full, 32, 8), (full, 64, 4), (full, 100, 2), (full, 224, 1), ([(0, 0, 130, 140)], 32, 4),
             (full + [(10, 20, 70, 90)], 32, 2), ([(0, 0, 50, 40)], 32, 1)]  # fmt: skip
    for crops, size, reduction in cases:
        img = Image.open(io.BytesIO(data))
        assert draft_for_crops(img, crops, size) == reduction, (crops, size)
        img.load()
        assert img.size == (512 // reduction, 384 // reduction)
    png = io.BytesIO()
    Image.open(io.BytesIO(data)).save(png, "PNG")
    assert draft_for_crops(Image.open(png), full, 32) == 1  # not a JPEG


def test_reduced_decoding_gives_the_full_decodings_crops():
    data = _photo_jpeg(512, 384)
    crops = [(0, 0, 384, 512), (100, 150, 260, 300)]  # decoded at 1/4 for 64 px views
    reduced = decode_crops(Image.open(io.BytesIO(data)), crops, 64, InterpolationMode.BILINEAR).float()
    img = Image.open(io.BytesIO(data)).convert("RGB")  # decoded in full
    for k, crop in enumerate(crops):
        top, left, bottom, right = (round(v / 4) * 4 for v in (crop[0], crop[1], crop[0] + crop[2], crop[1] + crop[3]))
        # the box edges fall on the reduced decoding's pixels: 150 and 450 (37.5 and 112.5 of them) move by 2
        full = np.asarray(img.crop((left, top, right, bottom)).resize((64, 64), Image.BILINEAR), dtype=np.float32)
        difference = reduced[k].permute(1, 2, 0).numpy() - full
        assert np.abs(difference).mean() < 2.0  # of 255: the same picture, as sharp


def test_device_augment_normalises_like_torchvision():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(images.float() / 255)
    params = torch.zeros(2, NUM_PARAMS)  # no photometric operation drawn
    torch.testing.assert_close(DeviceAugment(gpu_aug=False)(images, params), expected)
    torch.testing.assert_close(DeviceAugment(gpu_aug=True)(images, params), expected)


def test_workers_follow_the_cores_of_each_process(monkeypatch, caplog):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_num_workers(-1) == 15  # the process itself keeps a core
    assert resolve_num_workers(4) == 4 and resolve_num_workers(0) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 processes share the node's cores
    assert resolve_num_workers(-1) == 3
    assert resolve_num_workers(8) == 4 and "capped to the 4 CPU cores" in caplog.text
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_num_workers(-1) == 16


def test_loader_converts_every_mode_to_rgb(data_root):
    for (c, i), (mode, fmt) in SPECIAL.items():
        path = os.path.join(data_root, "train", CLASSES[c], f"img{i}.{'png' if fmt == 'PNG' else 'jpg'}")
        with Image.open(path) as raw:  # the file really has the unusual mode
            assert raw.mode == mode or (mode == "I;16" and raw.mode == "I")
        img = pil_rgb_loader(path)
        assert img.mode == "RGB" and img.size == (WIDTH, HEIGHT)
        with open(path, "rb") as f:
            assert np.array_equal(np.asarray(pil_rgb_loader(f.read())), np.asarray(img))


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    wide = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "g16.png")
    rgb = np.asarray(pil_rgb_loader(str(tmp_path / "g16.png")))
    assert rgb[0, :, 0].tolist() == [0, 100, 255]


# ----------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------
def test_zip_handles_are_reopened_in_a_forked_process(data_root, monkeypatch):
    zip_path = os.path.join(data_root, "train.zip")
    handle = zipreader.open_zip(zip_path)
    assert zipreader.open_zip(zip_path) is handle
    monkeypatch.setattr(zipreader.os, "getpid", lambda: -1)  # as seen from a child
    assert zipreader.open_zip(zip_path) is not handle
    assert zipreader.read(zip_path, "/cat/img2.jpg") == zipreader.read(zip_path, "cat/img2.jpg")


def test_loader_yields_two_different_views(data_root):
    dataset, data_loader = build_loader(make_config(data_root))
    assert len(dataset) == NUM_IMAGES
    assert len(data_loader) == NUM_IMAGES // 4
    ((view1, view2), (params1, params2)), target = next(iter(data_loader))
    for view, params in ((view1, params1), (view2, params2)):
        assert view.shape == (4, 3, 32, 32) and view.dtype == torch.uint8
        assert params.shape == (4, NUM_PARAMS) and params.dtype == torch.float32
    assert target.shape == (4,) and target.dtype == torch.int64
    assert not torch.equal(view1, view2) and not torch.equal(params1, params2)


@pytest.mark.parametrize("cache_mode", ["no", "full", "part"])
def test_zip_mode_reads_the_same_images_as_folder_mode(data_root, cache_mode):
    folder = build_dataset(make_config(data_root), T.ToTensor())
    zipped = build_dataset(make_config(data_root, ZIP_MODE=True, CACHE_MODE=cache_mode), T.ToTensor())
    assert isinstance(zipped, CachedImageFolder) and len(zipped) == len(folder) == NUM_IMAGES
    expected_cached = {"no": [], "full": list(range(NUM_IMAGES)), "part": list(range(NUM_IMAGES))}
    assert zipped.cached_indices == expected_cached[cache_mode]
    for i in range(NUM_IMAGES):
        (a, a_target), (b, b_target) = folder[i], zipped[i]
        assert a_target == b_target
        assert a.shape == (3, HEIGHT, WIDTH) and torch.equal(a, b)


@pytest.mark.parametrize("world_size", [2, 3])
def test_part_cache_shards_are_disjoint_and_cover_the_dataset(data_root, world_size):
    cfg = make_config(data_root, ZIP_MODE=True, CACHE_MODE="part")
    cached, sampled = [], []
    for rank in range(world_size):
        dataset = build_dataset(cfg, None, rank, world_size)
        sampler = build_sampler(cfg, dataset, rank, world_size)
        assert isinstance(sampler.sampler, ShardSampler)
        indices = [index for index, _ in sampler]
        assert sorted(indices) == dataset.cached_indices  # a rank samples only what it caches
        cached.append(set(dataset.cached_indices))
        sampled.append(indices)
    assert set().union(*cached) == set(range(NUM_IMAGES))
    assert sum(len(s) for s in cached) == NUM_IMAGES
    assert len({len(s) for s in sampled}) == 1  # same number of batches on every rank


def test_shard_sampler_reshuffles_per_epoch_and_drops_the_remainder():
    sampler = ShardSampler(11, rank=1, world_size=3, seed=0)
    assert len(sampler) == 3
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
        assert sorted(orders[-1]) == [1, 4, 7]
    assert len({tuple(o) for o in orders}) > 1
    sampler.set_epoch(2)
    assert list(sampler) == orders[2]


def test_distributed_sampler_splits_ranks_without_overlap(data_root):
    cfg = make_config(data_root)
    dataset = build_dataset(cfg, None)
    per_rank = []
    for rank in range(2):
        sampler = build_sampler(cfg, dataset, rank, 2)
        assert isinstance(sampler.sampler, torch.utils.data.DistributedSampler)
        assert sampler.sampler.drop_last and sampler.sampler.shuffle and sampler.sampler.seed == cfg.SEED
        per_rank.append([index for index, _ in sampler])
    assert len(per_rank[0]) == len(per_rank[1]) == NUM_IMAGES // 2
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == set(range(NUM_IMAGES))


def test_missing_folder_raises_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train")):
        build_loader(make_config(str(tmp_path)))


@pytest.mark.parametrize("missing", ["train.zip", "train_map.txt"])
def test_missing_zip_files_raise_naming_the_path(tmp_path, missing):
    for name in ("train.zip", "train_map.txt"):
        if name != missing:
            (tmp_path / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / missing)):
        build_loader(make_config(str(tmp_path), ZIP_MODE=True))


# ----------------------------------------------------------------------------
# Reproducibility across a resume
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_data_is_a_function_of_seed_epoch_and_rank(data_root, num_workers):
    cfg = make_config(data_root, NUM_WORKERS=num_workers)
    # An uninterrupted run: epochs 0 and 1, with the loop using the global RNG meanwhile.
    _, run = build_loader(cfg)
    epoch0 = epoch_batches(run, 0)
    torch.rand(5)
    epoch1 = epoch_batches(run, 1)
    # A run resumed at epoch 1 in a fresh process state (fresh loader, other global RNG).
    torch.manual_seed(1234)
    _, resumed = build_loader(cfg)
    state = torch.get_rng_state()
    assert_same_batches(epoch_batches(resumed, 1), epoch1)
    if num_workers == 0:
        assert torch.equal(torch.get_rng_state(), state)  # the loop's RNG stream is untouched
    # Another epoch, or another rank, sees other data.
    for a, b in zip(epoch0, epoch1, strict=True):
        assert not torch.equal(a[0][0][0], b[0][0][0])
    _, other_rank = build_loader(cfg, rank=1, world_size=2)
    _, rank0_of_2 = build_loader(cfg, rank=0, world_size=2)
    assert not torch.equal(epoch_batches(other_rank, 1)[0][0][0][0], epoch_batches(rank0_of_2, 1)[0][0][0][0])


def test_zip_loader_with_workers_matches_folder_loader_without(data_root):
    _, folder = build_loader(make_config(data_root))
    dataset, zipped = build_loader(make_config(data_root, ZIP_MODE=True, CACHE_MODE="no", NUM_WORKERS=2))
    dataset[0]  # the parent opens the zip before the workers fork
    assert_same_batches(epoch_batches(zipped, 3), epoch_batches(folder, 3))
