"""Damaged or stray files. In a training set (pretraining, main_linear.py's): skipped with a warning
and counted, never fatal. In a set measured whole (a validation set, k-NN's feature sets, the
retrieval images, DAVIS frames and masks): one error naming the file, also from a loader worker."""

import io
import logging
import os
import re
import zipfile
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import assert_same_batches, epoch_batches, make_config
from PIL import Image, ImageFile

from config import get_config
from data import build_linear_loaders, build_loader, set_loader_epoch, skipped_samples
from data.build import MAX_ATTEMPTS, replacement_index
from data.cached_image_folder import UnreadableImageError
from data.davis import Video
from data.retrieval import RetrievalImages, retrieval_loader
from faults import end_loader_workers

GOOD = {"a": 5, "b": 4}  # class -> number of good images: 9 good + 3 bad = 12 = 3 batches of 4


def _png(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _bad_files(rng: np.random.Generator) -> dict[str, bytes]:
    return {
        "a/random.jpg": rng.bytes(300),
        "a/truncated.png": _png(rng)[:400],
        "b/empty.jpg": b"",
    }


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory) -> str:
    """train/ with 9 good and 3 corrupt images, stray files and an empty class folder."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    files = {f"{c}/img{i}.png": _png(rng) for c, n in GOOD.items() for i in range(n)}
    files.update(_bad_files(rng))
    stray = {"a/.hidden.jpg": _png(rng), "b/notes.txt": b"notes", "b/meta.json": b"{}", ".cache/x.png": _png(rng)}
    for name, data in {**files, **stray}.items():
        os.makedirs(root / "train" / os.path.dirname(name), exist_ok=True)
        (root / "train" / name).write_bytes(data)
    os.makedirs(root / "train" / "c")  # a class without images
    return str(root)


@pytest.fixture(scope="module")
def bad_zip_root(tmp_path_factory) -> str:
    """train.zip + train_map.txt: 7 good images, 3 corrupt ones, one with a bad CRC, one missing."""
    root = tmp_path_factory.mktemp("badzip")
    rng = np.random.default_rng(1)
    members = {f"{c}/img{i}.png": _png(rng) for c, n in (("a", 4), ("b", 3)) for i in range(n)}
    members.update(_bad_files(rng))
    members["b/crc.png"] = _png(rng)
    with zipfile.ZipFile(root / "train.zip", "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    # flip a byte inside the stored data of b/crc.png: reading it fails its CRC check
    with zipfile.ZipFile(root / "train.zip") as zf:
        info = zf.getinfo("b/crc.png")
    raw = bytearray((root / "train.zip").read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + len(info.extra) + 100] ^= 0xFF
    (root / "train.zip").write_bytes(bytes(raw))
    names = sorted([*members, "b/missing.png"])
    (root / "train_map.txt").write_text("".join(f"{name}\t{'ab'.index(name[0])}\n" for name in names))
    return str(root)


@pytest.fixture
def data_warnings(tmp_path):
    """The lines logged by the data package, from this process and its forked workers."""
    path = tmp_path / "data.log"
    handler = logging.FileHandler(path)
    logging.getLogger("data").addHandler(handler)
    yield lambda: path.read_text().splitlines()
    logging.getLogger("data").removeHandler(handler)
    handler.close()


def expected_skips(data_loader, bad: set[int]) -> int:
    """Replay the sampler of the current epoch: the bad images its batches run into."""
    skips = 0
    for index, seed in list(data_loader.sampler)[: len(data_loader) * data_loader.batch_size]:
        attempt = 0
        while index in bad:
            skips += 1
            index = replacement_index(seed, attempt, len(data_loader.dataset))
            attempt += 1
    return skips


def check_epochs(data_loader, bad_sources: set[str], data_warnings, num_workers: int) -> None:
    dataset = data_loader.dataset.dataset
    bad = {i for i in range(len(dataset)) if dataset.source(i) in bad_sources}
    assert len(bad) == len(bad_sources)
    for epoch in range(2):
        set_loader_epoch(data_loader, epoch)
        assert skipped_samples(data_loader) == 0
        batches = list(data_loader)
        assert len(batches) == len(dataset) // 4 == 3
        for ((view1, view2), _), _ in batches:
            assert view1.shape == view2.shape == (4, 3, 32, 32) and view1.dtype == torch.uint8
        assert skipped_samples(data_loader) == expected_skips(data_loader, bad) >= len(bad)
    skips = [line for line in data_warnings() if "unreadable" in line]
    named = Counter(re.fullmatch(r"skipping unreadable image (.+?): \w+: .*", line)[1] for line in skips)
    # each file once per process that met it (all three are in every epoch)
    assert set(named) == bad_sources and max(named.values()) <= max(num_workers, 1)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


@pytest.mark.parametrize("num_workers", [0, 2])
def test_folder_epochs_complete_despite_corrupt_images(bad_root, num_workers, data_warnings):
    dataset, data_loader = build_loader(make_config(bad_root, NUM_WORKERS=num_workers))
    assert len(dataset) == 12 and dataset.classes == ["a", "b", "c"]
    bad = {os.path.join(bad_root, "train", name) for name in _bad_files(np.random.default_rng(0))}
    check_epochs(data_loader, bad, data_warnings, num_workers)


@pytest.mark.parametrize("cache_mode, num_workers", [("no", 2), ("full", 0), ("part", 0)])
def test_zip_epochs_complete_despite_corrupt_members(bad_zip_root, cache_mode, num_workers, data_warnings):
    cfg = make_config(bad_zip_root, ZIP_MODE=True, CACHE_MODE=cache_mode, NUM_WORKERS=num_workers)
    dataset, data_loader = build_loader(cfg)
    assert len(dataset) == 12
    zip_path = os.path.join(bad_zip_root, "train.zip")
    bad_members = [*_bad_files(np.random.default_rng(1)), "b/crc.png", "b/missing.png"]
    if cache_mode != "no":  # the members that cannot be read are left to the zip
        assert len(dataset.cached_indices) == 10
    check_epochs(data_loader, {f"{zip_path}:{name}" for name in bad_members}, data_warnings, num_workers)


def test_resumed_loader_repeats_an_epoch_with_bad_images(bad_root):
    _, run = build_loader(make_config(bad_root, NUM_WORKERS=0))
    epoch1 = epoch_batches(run, 1)
    torch.manual_seed(99)
    _, resumed = build_loader(make_config(bad_root, NUM_WORKERS=2))
    assert_same_batches(epoch_batches(resumed, 1), epoch1)
    assert skipped_samples(resumed) == skipped_samples(run) > 0


def test_a_folder_of_only_unreadable_images_fails_clearly(tmp_path):
    os.makedirs(tmp_path / "train" / "a")
    for i in range(4):
        (tmp_path / "train" / "a" / f"bad{i}.jpg").write_bytes(b"not an image")
    _, data_loader = build_loader(make_config(str(tmp_path)))
    set_loader_epoch(data_loader, 0)
    with pytest.raises(RuntimeError, match=rf"{MAX_ATTEMPTS} unreadable images in a row, from .*bad.\.jpg"):
        next(iter(data_loader))


def test_stray_entries_are_ignored_with_one_warning(bad_root, caplog):
    _, data_loader = build_loader(make_config(bad_root))
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(ignored) == 1
    assert ignored[0].startswith(f"ignored 5 hidden or non-image entries under {os.path.join(bad_root, 'train')}")
    for name in (".cache", os.path.join("a", ".hidden.jpg"), os.path.join("b", "notes.txt"), "c" + os.sep):
        assert name in ignored[0]
    sources = {os.path.basename(path) for path, _ in data_loader.dataset.dataset.samples}
    assert not sources & {".hidden.jpg", "notes.txt", "meta.json", "x.png"}
    assert data_loader.dataset.dataset.class_to_idx == {"a": 0, "b": 1, "c": 2}


def test_folder_without_images_raises_naming_it(tmp_path):
    os.makedirs(tmp_path / "train" / "a")
    (tmp_path / "train" / "a" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train")):
        build_loader(make_config(str(tmp_path)))


# -----------------------------------------------------------------------------
# Evaluation: main_linear.py's training set skips, the sets measured whole stop
# -----------------------------------------------------------------------------
def _truncated_jpeg(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def _linear_folder(root, bad_split: str) -> list[str]:
    """train/ and val/ of 2 classes x 3 good PNGs; ``bad_split`` also holds a truncated JPEG and an
    empty file, whose paths are returned."""
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(3):
                (root / split / c / f"img{i}.png").write_bytes(_png(rng))
    bad = [root / bad_split / "a" / "truncated.jpg", root / bad_split / "b" / "empty.jpg"]
    bad[0].write_bytes(_truncated_jpeg(rng))
    bad[1].write_bytes(b"")
    return [str(path) for path in bad]


def _linear_config(root, num_workers: int):
    config = get_config()
    config.defrost()
    config.merge_from_list(["DATA.DATA_PATH", str(root), "DATA.IMG_SIZE", 16, "DATA.BATCH_SIZE", 2,
                            "DATA.NUM_WORKERS", num_workers])  # fmt: skip
    config.freeze()
    return config


@pytest.mark.parametrize("num_workers", [0, 2])
def test_linear_training_set_replaces_unreadable_images(tmp_path, num_workers, data_warnings):
    bad = _linear_folder(tmp_path, "train")
    train_set, _, train_loader, _, _ = build_linear_loaders(_linear_config(tmp_path, num_workers), 0, 1)
    assert len(train_set) == 8 and len(train_loader) == 4
    bad_indices = {i for i, (path, _) in enumerate(train_set.samples) if path in bad}
    for epoch in range(2):
        set_loader_epoch(train_loader, epoch)
        batches = list(train_loader)
        assert [images.shape for images, _ in batches] == [(2, 3, 16, 16)] * 4
        assert skipped_samples(train_loader) == expected_skips(train_loader, bad_indices) >= 2
    skips = [line for line in data_warnings() if "unreadable" in line]
    named = Counter(re.fullmatch(r"skipping unreadable image (.+?): \w+: .*", line)[1] for line in skips)
    assert set(named) == set(bad) and max(named.values()) <= max(num_workers, 1)
    # the same epoch again: the same images, the same replacements
    set_loader_epoch(train_loader, 1)
    again = list(train_loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, batches, strict=True))


def _stops_naming(loader, bad: list[str]) -> str:
    """The one line iterating ``loader`` stops with, naming one of the files ``bad``. Its workers are
    then ended as cli.run_cli ends them: they ignore SIGTERM, and the error's traceback keeps them."""
    try:
        with pytest.raises(UnreadableImageError) as error:
            for _ in loader:
                pass
    finally:
        end_loader_workers()
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message and "DataLoader worker" not in message
    assert re.fullmatch(rf"unreadable image ({'|'.join(map(re.escape, bad))}): \w+: .+", message), message
    return message


@pytest.mark.parametrize("num_workers", [0, 1])
def test_linear_val_set_stops_naming_an_unreadable_image(tmp_path, num_workers):
    bad = _linear_folder(tmp_path, "val")
    _, _, train_loader, val_loader, _ = build_linear_loaders(_linear_config(tmp_path, num_workers), 0, 1)
    message = _stops_naming(val_loader, bad)
    assert message.endswith(
        "; an evaluation set is measured whole, so no image is skipped: replace the file or remove it"
    )
    set_loader_epoch(train_loader, 0)
    assert len(list(train_loader)) == 3 and skipped_samples(train_loader) == 0


@pytest.mark.parametrize("bad_split", ["train", "val"])
def test_knn_feature_sets_stop_naming_an_unreadable_image(tmp_path, bad_split):
    bad = _linear_folder(tmp_path, bad_split)
    _, _, train_loader, val_loader, _ = build_linear_loaders(_linear_config(tmp_path, 1), 0, 1, for_features=True)
    _stops_naming(train_loader if bad_split == "train" else val_loader, bad)


def test_retrieval_images_stop_naming_an_unreadable_one(tmp_path):
    rng = np.random.default_rng(3)
    paths = [str(tmp_path / f"{name}.jpg") for name in ("good", "truncated", "empty")]
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(paths[0])
    (tmp_path / "truncated.jpg").write_bytes(_truncated_jpeg(rng))
    (tmp_path / "empty.jpg").write_bytes(b"")
    images = RetrievalImages(paths, [None] * 3, max_side=32, fit_size=lambda h, w: (h, w))
    # the empty file: its header, read when the loader sorts the images by size
    with pytest.raises(UnreadableImageError, match=rf"^unreadable image {re.escape(paths[2])}: UnidentifiedImageError"):
        retrieval_loader(images, 0, 1, batch_size=2, num_workers=1, pin_memory=False)
    # the truncated one: its pixels, read in a loader worker
    images = RetrievalImages(paths[:2], [None, [0, 0, 20, 20]], max_side=32, fit_size=lambda h, w: (h, w))
    loader, _ = retrieval_loader(images, 0, 1, batch_size=2, num_workers=1, pin_memory=False)
    assert _stops_naming(loader, [paths[1]]).startswith(
        f"unreadable image {paths[1]}: OSError: image file is truncated"
    )


def test_davis_frames_and_masks_stop_naming_an_unreadable_one(tmp_path):
    rng = np.random.default_rng(4)
    frames = [str(tmp_path / f"{t:05d}.jpg") for t in range(2)]
    masks = [str(tmp_path / f"{t:05d}.png") for t in range(2)]
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(frames[0])
    (tmp_path / "00001.jpg").write_bytes(_truncated_jpeg(rng))
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(masks[0])
    palette = io.BytesIO()
    Image.fromarray(rng.integers(0, 3, (32, 32), dtype=np.uint8), mode="L").convert("P").save(palette, "PNG")
    (tmp_path / "00001.png").write_bytes(palette.getvalue()[: len(palette.getvalue()) // 2])
    video = Video("v", frames, masks)
    assert video.read_frame(0).shape == (32, 32, 3) and video.read_mask(0)[0].shape == (32, 32)
    for read, path in ((video.read_frame, frames[1]), (video.read_mask, masks[1])):
        with pytest.raises(UnreadableImageError, match=rf"^unreadable image {re.escape(path)}: \w+: .+: replace it$"):
            read(1)
