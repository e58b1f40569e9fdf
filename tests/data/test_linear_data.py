"""Linear-evaluation data (``data/linear.py``) on tiny copies of every dataset's own files.

Each fixture writes, under ``tmp_path``, the files torchvision's dataset class reads, in
their real layout and format (pickled CIFAR batches, STL10 binaries, ``.mat`` files, split
lists, VOC XML, ...), with a few tiny images. Nothing is downloaded: the ``offline``
fixture refuses network connections. torchvision checks the md5 of CIFAR's, STL10's,
Flowers102's and Places365's files against the real archives', which no fixture can
match, so ``offline`` also makes md5 checks pass; the rest is torchvision's own code.
"""

import inspect
import json
import os
import socket
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, write_cifar10, write_pickle
from PIL import Image
from torch.utils.data import ConcatDataset, DistributedSampler, Subset
from torchvision import datasets as tvd
from torchvision import transforms as T
from torchvision.datasets import utils as tv_utils

from config import get_config
from data import build_linear_loaders, set_loader_epoch
from data import linear as L
from data.build import sample_source
from data.cached_image_folder import CachedImageFolder
from data.linear import build_transfer_sets
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_linear_transform

IMG_SIZE = 16


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(tv_utils, "check_md5", lambda *args, **kwargs: True)


def make_config(dataset: str, root, **opts):
    config = get_config()
    config.defrost()
    config.merge_from_list(
        [
            "DATA.DATASET", dataset,
            "DATA.TRANSFER_ROOT", str(root),
            "DATA.DATA_PATH", str(root),
            "DATA.IMG_SIZE", IMG_SIZE,
            "DATA.BATCH_SIZE", 2,
            "DATA.NUM_WORKERS", 0,
        ]
    )  # fmt: skip
    for key, value in opts.items():
        config.merge_from_list([key.replace("__", "."), value])
    config.freeze()
    return config


# -----------------------------------------------------------------------------
# Fixture writers: each writes one dataset under root and returns
# (number of classes, training images, test images)
# -----------------------------------------------------------------------------
def _image(rng, mode="RGB", size=(11, 9)) -> Image.Image:
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    return rgb.quantize(colors=8) if mode == "P" else rgb.convert(mode)


def _save(path: Path, rng, mode="RGB", fmt="JPEG", size=(11, 9)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _image(rng, mode, size).save(path, fmt)


def write_cifar100(root: Path, rng):
    base = root / "cifar-100-python"
    for split, n in (("train", 6), ("test", 4)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        write_pickle(base / split, {"data": data, "fine_labels": [i % 4 for i in range(n)], "coarse_labels": [0] * n})
    names = {"fine_label_names": ["apple", "bear", "cloud", "dolphin"], "coarse_label_names": ["x"]}
    write_pickle(base / "meta", names)
    return 4, 6, 4


def write_stl10(root: Path, rng):
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    for split, n in (("train", 6), ("test", 3), ("unlabeled", 1)):
        rng.integers(0, 256, n * 3 * 96 * 96, dtype=np.uint8).tofile(base / f"{split}_X.bin")
        if split != "unlabeled":
            np.array([1 + i % 3 for i in range(n)], dtype=np.uint8).tofile(base / f"{split}_y.bin")  # 1-based
    (base / "class_names.txt").write_text("airplane\nbird\ncar\n")
    return 3, 6, 3


def write_flowers(root: Path, rng):
    base = root / "flowers-102"
    labels = [1, 2, 3] * 4  # image_00001..00012, classes 1-based
    for image_id in range(1, 13):
        _save(base / "jpg" / f"image_{image_id:05d}.jpg", rng, mode="L" if image_id == 8 else "RGB")
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    split = {"trnid": [1, 2, 3], "valid": [4, 5, 6], "tstid": [7, 8, 9, 10, 11, 12]}
    scipy.io.savemat(base / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in split.items()})
    return 3, 6, 6


def write_pets(root: Path, rng):
    base = root / "oxford-iiit-pet"
    breeds = (("Abyssinian", 1), ("american_bulldog", 2), ("Bengal", 1))  # (breed, species: 1 cat, 2 dog)
    for split, numbers in (("trainval", (1, 2)), ("test", (3,))):
        lines = []
        for class_id, (breed, species) in enumerate(breeds, 1):
            for k in numbers:
                _save(base / "images" / f"{breed}_{k}.jpg", rng, mode="L" if k == 3 else "RGB")
                lines.append(f"{breed}_{k} {class_id} {species} {k}\n")
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f"{split}.txt").write_text("".join(lines))
    return 3, 6, 3


def write_food101(root: Path, rng):
    base = root / "food-101"
    classes = ("apple_pie", "baby_back_ribs")
    for split, ids in (("train", (101, 102, 103)), ("test", (201,))):
        meta = {c: [f"{c}/{i}" for i in ids] for c in classes}
        for c in classes:
            for i in ids:
                _save(base / "images" / c / f"{i}.jpg", rng)
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
    return 2, 6, 2


def _cars_annotations(path: Path, fnames, classes) -> None:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    records = np.zeros(len(fnames), dtype=[(f, "O") for f in fields])
    for i, (fname, cls) in enumerate(zip(fnames, classes, strict=True)):
        records[i] = (1, 1, 8, 6, cls, fname)
    scipy.io.savemat(path, {"annotations": records})


def write_cars(root: Path, rng):
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TT Coupe 2011"], dtype=object)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    for split, n, annos in (
        ("train", 6, base / "devkit" / "cars_train_annos.mat"),
        ("test", 3, base / "cars_test_annos_withlabels.mat"),
    ):
        fnames = [f"{i + 1:05d}.jpg" for i in range(n)]
        for fname in fnames:
            _save(base / f"cars_{split}" / fname, rng, mode="CMYK" if fname == "00002.jpg" else "RGB")
        _cars_annotations(annos, fnames, [1 + i % 3 for i in range(n)])  # 1-based
    return 3, 6, 3


CALTECH_PER_CLASS = 32  # the split needs more than 30 per class


def write_caltech101(root: Path, rng):
    base = root / "caltech101" / "101_ObjectCategories"
    for c, name in enumerate(("accordion", "airplanes")):
        for i in range(1, CALTECH_PER_CLASS + 1):
            _save(base / name / f"image_{i:04d}.jpg", rng, mode="L" if (c, i) == (0, 5) else "RGB", size=(6, 5))
    _save(base / "BACKGROUND_Google" / "image_0001.jpg", rng)
    return 2, 2 * 30, 2 * (CALTECH_PER_CLASS - 30)


def write_dtd(root: Path, rng):
    base = root / "dtd" / "dtd"
    classes = ("banded", "blotchy", "braided")
    for k, split in enumerate(("train1", "val1", "test1"), 1):
        lines = []
        for c in classes:
            _save(base / "images" / c / f"{c}_{k:04d}.jpg", rng)
            lines.append(f"{c}/{c}_{k:04d}.jpg\n")
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{split}.txt").write_text("".join(lines))
    return 3, 6, 3


def write_aircraft(root: Path, rng):
    base = root / "fgvc-aircraft-2013b" / "data"
    variants = ("707-320", "A300B4", "BAE 146-200")
    base.mkdir(parents=True)
    (base / "variants.txt").write_text("".join(f"{v}\n" for v in variants))
    image_id = 1000000
    for split, per_class in (("trainval", 2), ("test", 1)):
        lines = []
        for v in variants:
            for _ in range(per_class):
                image_id += 1
                _save(base / "images" / f"{image_id}.jpg", rng)
                lines.append(f"{image_id} {v}\n")
        (base / f"images_variant_{split}.txt").write_text("".join(lines))
    return 3, 6, 3


SUN_CLASSES = ("/a/abbey", "/a/apartment_building/outdoor", "/b/bedroom")


def write_sun397(root: Path, rng):
    base = root / "SUN397"
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("".join(f"{c}\n" for c in SUN_CLASSES))
    sizes = (4, 5, 2)  # -> train 2, 2, 1
    for c, n in zip(SUN_CLASSES, sizes, strict=True):
        for i in range(n):
            mode = "L" if (c, i) == ("/b/bedroom", 0) else "RGB"
            _save(base / c.lstrip("/") / f"sun_{c[3:].replace('/', '_')}{i}.jpg", rng, mode=mode)
    return 3, 2 + 2 + 1, 2 + 3 + 1


def _voc_xml(path: Path, objects) -> None:
    """objects: (name, (xmin, ymin, xmax, ymax), difficult)."""
    parts = ["<annotation><folder>VOC2007</folder><filename>x.jpg</filename>"]
    parts.append("<size><width>64</width><height>48</height><depth>3</depth></size>")
    for name, (x1, y1, x2, y2), difficult in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{int(difficult)}"
            f"</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>"
            "</object>"
        )
    parts.append("</annotation>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


# image id -> (split, objects, expected single label)
VOC_IMAGES = {
    # the large person is difficult: the dog wins
    "000001": ("trainval", [("dog", (1, 1, 10, 10), False), ("person", (1, 1, 40, 40), True)], "dog"),
    # largest by area, not by width
    "000002": ("trainval", [("cat", (1, 1, 30, 3), False), ("dog", (1, 1, 12, 12), False)], "dog"),
    # every object difficult: the largest of them
    "000003": ("trainval", [("person", (1, 1, 5, 5), True), ("cat", (1, 1, 20, 20), True)], "cat"),
    "000004": ("test", [("person", (2, 2, 9, 9), False)], "person"),
    # a tie: the first in the file
    "000005": ("test", [("cat", (1, 1, 10, 10), False), ("dog", (11, 11, 20, 20), False)], "cat"),
}
VOC_CLASSES = ["cat", "dog", "person"]


def write_voc2007(root: Path, rng):
    base = root / "VOCdevkit" / "VOC2007"
    splits = {"trainval": [], "test": []}
    for image_id, (split, objects, _) in VOC_IMAGES.items():
        _save(base / "JPEGImages" / f"{image_id}.jpg", rng, mode="L" if image_id == "000004" else "RGB")
        _voc_xml(base / "Annotations" / f"{image_id}.xml", objects)
        splits[split].append(image_id)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    for split, ids in splits.items():
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return 3, 3, 2


def write_places365(root: Path, rng):
    classes = ("/a/airfield", "/b/bedroom", "/c/canyon")
    root.mkdir(parents=True, exist_ok=True)
    (root / "categories_places365.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(classes)))
    train_lines, val_lines = [], []
    for i, c in enumerate(classes):
        for k in (1, 2):
            _save(root / "data_256_standard" / c.lstrip("/") / f"{k:08d}.jpg", rng)
            train_lines.append(f"{c}/{k:08d}.jpg {i}\n")
        name = f"Places365_val_{i + 1:08d}.jpg"
        _save(root / "val_256" / name, rng, mode="P", fmt="PNG")  # a palette image behind a .jpg name
        val_lines.append(f"{name} {i}\n")
    (root / "places365_train_standard.txt").write_text("".join(train_lines))
    (root / "places365_val.txt").write_text("".join(val_lines))
    return 3, 6, 3


IMAGENET_CLASSES = ("n01", "n02", "n03")


def write_imagenet(root: Path, rng):
    """Folders train/ and val/, and the same images as train.zip/val.zip + maps."""
    import zipfile

    for split, per_class in (("train", 3), ("val", 2)):
        members = []
        for c, name in enumerate(IMAGENET_CLASSES):
            for i in range(per_class):
                member = f"{name}/{split}_{i}.jpg"
                _save(root / split / member, rng, mode="CMYK" if (split, c, i) == ("val", 1, 0) else "RGB")
                members.append((member, c))
        with zipfile.ZipFile(root / f"{split}.zip", "w") as zf:
            for member, _ in members:
                zf.write(root / split / member, member)
        (root / f"{split}_map.txt").write_text("".join(f"{m}\t{c}\n" for m, c in members))
    return 3, 9, 6


WRITERS = {
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
    "stl10": write_stl10,
    "flowers": write_flowers,
    "pets": write_pets,
    "food101": write_food101,
    "cars": write_cars,
    "caltech101": write_caltech101,
    "dtd": write_dtd,
    "aircraft": write_aircraft,
    "sun397": write_sun397,
    "voc2007": write_voc2007,
    "places365": write_places365,
    "imagenet": write_imagenet,
    "imagenet100": write_imagenet,
}


def sample_ids(dataset) -> list:
    """A stable identity of every sample (its file, or its pixels for array datasets)."""
    if isinstance(dataset, Subset):
        ids = sample_ids(dataset.dataset)
        return [ids[i] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        return [i for part in dataset.datasets for i in sample_ids(part)]
    if isinstance(dataset, tvd.CIFAR10 | tvd.STL10):
        return [row.tobytes() for row in dataset.data]
    if isinstance(dataset, tvd.Caltech101):
        return [f"{dataset.categories[y]}/image_{i:04d}.jpg" for y, i in zip(dataset.y, dataset.index, strict=True)]
    if isinstance(dataset, tvd.ImageFolder | L.ImageList | tvd.StanfordCars | CachedImageFolder):
        samples = dataset._samples if isinstance(dataset, tvd.StanfordCars) else dataset.samples
        return [str(path) for path, _ in samples]
    if isinstance(dataset, tvd.Places365):
        return [path for path, _ in dataset.imgs]
    if isinstance(dataset, tvd.OxfordIIITPet):
        return [str(p) for p in dataset._images]
    return [str(p) for p in dataset._image_files]


def build(name, root, **opts):
    return build_linear_loaders(make_config(name, root, **opts), rank=0, world_size=1)


def _check_sample(sample, num_classes):
    img, label = sample
    assert isinstance(img, torch.Tensor) and img.shape == (3, IMG_SIZE, IMG_SIZE) and img.dtype == torch.float32
    assert type(label) is int and 0 <= label < num_classes


# -----------------------------------------------------------------------------
# Every dataset
# -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, zip_mode", [(name, False) for name in WRITERS] + [("imagenet", True), ("imagenet100", True)]
)
def test_builds_each_dataset(tmp_path, name, zip_mode):
    num_classes, n_train, n_test = WRITERS[name](tmp_path, np.random.default_rng(0))
    train_set, val_set, train_loader, val_loader, got_classes = build(name, tmp_path, DATA__ZIP_MODE=zip_mode)
    assert got_classes == num_classes
    assert (len(train_set), len(val_set)) == (n_train, n_test)
    train_ids, val_ids = sample_ids(train_set), sample_ids(val_set)
    assert len(set(train_ids)) == n_train and len(set(val_ids)) == n_test
    assert not set(train_ids) & set(val_ids)
    # every sample: the non-RGB ones in the fixtures among them
    for dataset in (train_set, val_set):
        labels = L.dataset_targets(dataset)
        for i in range(len(dataset)):
            img, label = dataset[i]
            _check_sample((img, label), num_classes)
            assert label == labels[i]
    assert set(L.dataset_targets(train_set)) | set(L.dataset_targets(val_set)) == set(range(num_classes))
    images, labels = next(iter(train_loader))
    assert images.shape == (2, 3, IMG_SIZE, IMG_SIZE) and labels.dtype == torch.int64
    assert sum(len(labels) for _, labels in val_loader) == n_test


@pytest.mark.parametrize("alias", list(L.DATASET_ALIASES))
def test_aliases_build_the_same_dataset(tmp_path, alias):
    name = L.DATASET_ALIASES[alias]
    WRITERS[name](tmp_path, np.random.default_rng(0))
    canonical, aliased = build(name, tmp_path), build(alias.upper() if alias == "voc" else alias, tmp_path)
    assert type(aliased[0]) is type(canonical[0]) and aliased[4] == canonical[4]
    for a, b in ((aliased[0], canonical[0]), (aliased[1], canonical[1])):
        assert sample_ids(a) == sample_ids(b) and L.dataset_targets(a) == L.dataset_targets(b)


def test_unknown_dataset_lists_the_valid_names(tmp_path):
    with pytest.raises(ValueError, match="unknown DATA.DATASET 'mnist'") as e:
        build("mnist", tmp_path)
    for name in (*L.LINEAR_DATASETS, *L.DATASET_ALIASES):
        assert name in str(e.value)


def test_grayscale_becomes_three_channels(tmp_path):
    write_caltech101(tmp_path, np.random.default_rng(0))
    _, val_set, *_ = build("caltech101", tmp_path)
    # Caltech101 opens images without converting them; image_0005 of accordion is grayscale
    base = val_set.dataset
    index = next(i for i, (y, k) in enumerate(zip(base.y, base.index, strict=True)) if (y, k) == (0, 5))
    with Image.open(tmp_path / "caltech101/101_ObjectCategories/accordion/image_0005.jpg") as raw:
        assert raw.mode == "L"
    img, _ = base[index]
    pixels = img * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert img.shape == (3, IMG_SIZE, IMG_SIZE)
    torch.testing.assert_close(pixels[0], pixels[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[1], pixels[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [name for name in WRITERS if name not in ("cifar10", "cifar100", "stl10")])
def test_every_sample_names_its_file(tmp_path, name):
    """What a warning or error about an unreadable image names: the sample's own file."""
    WRITERS[name](tmp_path, np.random.default_rng(0))
    for dataset in build(name, tmp_path)[:2]:
        sources = [sample_source(dataset, i) for i in range(len(dataset))]
        assert len(set(sources)) == len(dataset) and all(os.path.isfile(path) for path in sources), sources


# -----------------------------------------------------------------------------
# Dataset-specific rules
# -----------------------------------------------------------------------------
def test_cars_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build("cars", tmp_path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"cars is not under {tmp_path} (DATA.TRANSFER_ROOT)")
    for path, _ in L.CARS_LAYOUT:
        assert os.path.join(str(tmp_path), path) in message
    assert "can no longer be downloaded" in message
    # with the devkit in place, only the rest is reported missing
    (tmp_path / "stanford_cars" / "devkit").mkdir(parents=True)
    for name in ("cars_meta.mat", "cars_train_annos.mat"):
        (tmp_path / "stanford_cars" / "devkit" / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        build("stanford_cars", tmp_path)
    missing = str(e.value).split("missing: ")[1]
    assert "cars_meta.mat" not in missing and "cars_train_annos.mat" not in missing
    assert "cars_train" in missing and "cars_test_annos_withlabels.mat" in missing and "cars_test" in missing


@pytest.mark.parametrize("name", ["caltech101", "sun397"])
def test_seeded_splits_are_fixed(tmp_path, name):
    WRITERS[name](tmp_path, np.random.default_rng(0))
    first, second = build(name, tmp_path, SEED=0), build(name, tmp_path, SEED=123)
    for a, b in zip(first[:2], second[:2], strict=True):
        assert sample_ids(a) == sample_ids(b)
    train, test = sample_ids(first[0]), sample_ids(first[1])
    everything = sample_ids(first[0].dataset)
    assert sorted(train + test) == sorted(everything)  # a partition
    train_labels, test_labels = L.dataset_targets(first[0]), L.dataset_targets(first[1])
    if name == "caltech101":
        assert all(train_labels.count(c) == 30 for c in range(2))
        assert all(test_labels.count(c) == CALTECH_PER_CLASS - 30 for c in range(2))
    else:
        assert [train_labels.count(c) for c in range(3)] == [2, 2, 1]
        assert [test_labels.count(c) for c in range(3)] == [2, 3, 1]


def test_seeded_class_split_ignores_listing_order_and_other_classes():
    keys = [f"{c}/{i}" for c in "ab" for i in range(10)]
    names = [k[0] for k in keys]
    train, _ = L.seeded_class_split(keys, names, lambda _, n: n // 2)
    chosen = {keys[i] for i in train}
    order = np.random.default_rng(1).permutation(len(keys))
    train2, _ = L.seeded_class_split([keys[i] for i in order], [names[i] for i in order], lambda _, n: n // 2)
    assert {keys[order[i]] for i in train2} == chosen
    only_a = [k for k in keys if k[0] == "a"]
    train3, _ = L.seeded_class_split(only_a, ["a"] * 10, lambda _, n: n // 2)
    assert {only_a[i] for i in train3} == {k for k in chosen if k[0] == "a"}
    assert len(chosen) == 10


def test_voc_single_label_rule(tmp_path):
    write_voc2007(tmp_path, np.random.default_rng(0))
    train_set, val_set, *_, num_classes = build("voc2007", tmp_path)
    assert train_set.classes == VOC_CLASSES and num_classes == 3
    for dataset in (train_set, val_set):
        for path, label in dataset.samples:
            assert VOC_CLASSES[label] == VOC_IMAGES[Path(path).stem][2]
    # a class that is no image's label still gets its index
    objects = VOC_IMAGES["000002"][1] + [("bird", (1, 1, 2, 2), False)]
    _voc_xml(tmp_path / "VOCdevkit/VOC2007/Annotations/000002.xml", objects)
    train_set, *_, num_classes = build("voc", tmp_path)
    assert train_set.classes == ["bird", *VOC_CLASSES] and num_classes == 4
    assert [train_set.classes[label] for label in train_set.targets] == ["dog", "dog", "cat"]
    assert L.voc_single_label([("a", 4.0, True), ("b", 1.0, False)]) == "b"
    with pytest.raises(ValueError):
        L.voc_single_label([])


def test_imagenet_class_folders_must_agree(tmp_path):
    write_imagenet(tmp_path, np.random.default_rng(0))
    os.rename(tmp_path / "val" / "n03", tmp_path / "val" / "n04")
    with pytest.raises(ValueError, match="different classes"):
        build("imagenet", tmp_path)


def test_downloads_only_missing_sets(tmp_path, monkeypatch):
    """A present set is opened with download=False (VOC would re-download otherwise)."""
    write_voc2007(tmp_path, np.random.default_rng(0))
    flags = []
    original = tvd.VOCDetection.__init__

    def spy(self, *args, download=False, **kwargs):
        flags.append(download)
        original(self, *args, download=download, **kwargs)

    monkeypatch.setattr(tvd.VOCDetection, "__init__", spy)
    build("voc2007", tmp_path)
    assert flags == [False, False]
    with pytest.raises(AssertionError, match="network"):  # missing: torchvision tries to download
        build("voc2007", tmp_path / "empty")


# -----------------------------------------------------------------------------
# Offline: a failed download is one line saying where the files go
# -----------------------------------------------------------------------------
def _unreachable(monkeypatch, error: Exception) -> None:
    """torchvision's downloads (urllib) fail with ``error``, as on a node without internet access."""

    def urlopen(*args, **kwargs):
        raise error

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def test_the_download_table_agrees_with_torchvision():
    urls = {name: [url for _, url in files] for name, (_, files) in L.TRANSFER_FILES.items()}
    assert set(urls) == set(L.TRANSFER_DATASETS) - {"cars"}
    for name, archive in (("cifar10", tvd.CIFAR10), ("cifar100", tvd.CIFAR100), ("stl10", tvd.STL10)):
        assert L.TRANSFER_FILES[name][1] == [(archive.filename, archive.url)]
    flowers = tvd.Flowers102._file_dict
    assert urls["flowers"] == [tvd.Flowers102._download_url_prefix + flowers[k][0] for k in ("image", "label", "setid")]
    assert urls["pets"] == [url for url, _ in tvd.OxfordIIITPet._RESOURCES]
    assert urls["food101"] == [tvd.Food101._URL] and urls["dtd"] == [tvd.DTD._URL]
    assert urls["aircraft"] == [tvd.FGVCAircraft._URL] and urls["sun397"] == [tvd.SUN397._DATASET_URL]
    assert urls["caltech101"][0] in inspect.getsource(tvd.Caltech101.download)
    voc = tvd.voc.DATASET_YEAR_DICT
    assert L.TRANSFER_FILES["voc2007"][1] == [(voc[y]["filename"], voc[y]["url"]) for y in ("2007", "2007-test")]
    places = [
        tvd.Places365._DEVKIT_META["standard"],
        *(tvd.Places365._IMAGES_META[s, True] for s in ("train-standard", "val")),
    ]
    assert L.TRANSFER_FILES["places365"][1] == [(f, tvd.Places365._BASE_URL + f) for f, _ in places]


@pytest.mark.parametrize("name", [name for name in L.TRANSFER_DATASETS if name != "cars"])
def test_a_failed_download_is_one_line_naming_the_files(tmp_path, monkeypatch, name):
    _unreachable(monkeypatch, urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution")))
    with pytest.raises(L.TransferDataError) as e:
        build(name, tmp_path)
    message = str(e.value)
    needed, files = L.TRANSFER_FILES[name]
    assert "\n" not in message and message.startswith(f"{name} is not under {tmp_path} (DATA.TRANSFER_ROOT)")
    assert (
        "could not be downloaded (URLError: <urlopen error [Errno -3] Temporary failure in name resolution>)" in message
    )
    for path, url in files:  # where torchvision looks for each file, and where it comes from
        assert f"{tmp_path}/{path}" in message and url in message and url.endswith(os.path.basename(path))
    for path in needed:
        assert f"{tmp_path}/{path}" in message


@pytest.mark.parametrize(
    "error",
    [urllib.error.HTTPError("https://x/a.tar.gz", 503, "Service Unavailable", None, None),
     ConnectionResetError(104, "reset"), TimeoutError("timed out"), RuntimeError("File not found or corrupted.")],
    ids=["http", "reset", "timeout", "corrupted"],
)  # fmt: skip
def test_every_failure_of_a_download_is_one_line(tmp_path, monkeypatch, error):
    if isinstance(error, RuntimeError):  # what torchvision raises when the md5 of what it fetched is wrong

        def download_url(*args, **kwargs):
            raise error

        monkeypatch.setattr(tv_utils, "download_url", download_url)
    else:
        _unreachable(monkeypatch, error)
    with pytest.raises(L.TransferDataError, match=rf"^cifar100 .*\({type(error).__name__}: .*cifar-100-python.tar.gz"):
        build_transfer_sets("cifar100", str(tmp_path), None, None)


def test_other_errors_are_left_as_they_are(tmp_path, monkeypatch):
    for bug in (ValueError("a bug"), RuntimeError("a bug"), AttributeError("a bug")):
        _unreachable(monkeypatch, bug)
        with pytest.raises(type(bug), match="^a bug$"):
            build_transfer_sets("dtd", str(tmp_path), None, None)


def test_a_damaged_set_is_one_line_saying_what_to_remove(tmp_path, monkeypatch):
    write_cifar10(tmp_path, np.random.default_rng(0))
    monkeypatch.setattr(tv_utils, "check_md5", lambda *args, **kwargs: False)  # the batches are not the real ones
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda path, md5=None: tv_utils.check_integrity(path, md5))
    with pytest.raises(L.TransferDataError) as e:
        build("cifar10", tmp_path)
    assert str(e.value).startswith(
        f"cifar10 is incomplete or damaged under {tmp_path} (DATA.TRANSFER_ROOT) (RuntimeError: Dataset not found or "
        f"corrupted. You can use download=True to download it): remove {tmp_path}/cifar-10-batches-py/, then on a "
        "machine with internet access fetch https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and put it at "
        f"{tmp_path}/cifar-10-python.tar.gz;"
    )


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10", "food101", "dtd", "aircraft", "sun397"])
def test_an_archive_put_where_the_message_says_is_unpacked(tmp_path, monkeypatch, name):
    """The advice of the message works: the archive (here made of the fixture's files) at its place
    is checked and unpacked by torchvision, without the network."""
    num_classes, n_train, n_test = WRITERS[name](tmp_path / "source", np.random.default_rng(0))
    ((archive, _),) = L.TRANSFER_FILES[name][1]
    folder = os.path.dirname(archive)  # torchvision unpacks an archive where it lies
    (tmp_path / "root" / folder).mkdir(parents=True, exist_ok=True)
    with tarfile.open(tmp_path / "root" / archive, "w:gz" if archive.endswith("gz") else "w") as tar:
        for entry in sorted(os.listdir(tmp_path / "source" / folder)):
            tar.add(tmp_path / "source" / folder / entry, arcname=entry)
    _unreachable(monkeypatch, urllib.error.URLError("no network"))
    train_set, val_set, *_, got_classes = build(name, tmp_path / "root")
    assert (len(train_set), len(val_set), got_classes) == (n_train, n_test, num_classes)


# -----------------------------------------------------------------------------
# Transforms and loaders
# -----------------------------------------------------------------------------
def test_linear_transforms(tmp_path):
    # the original's (AUG.SSL_LINEAR_AUG): bilinear; test resize to IMG_SIZE + 32 (96 at 64 px, where 64 / 0.875 is 73)
    config = make_config("imagenet", tmp_path, DATA__IMG_SIZE=64)
    ssl = build_linear_transform(config, is_train=True).transforms
    assert [type(t) for t in ssl[1:]] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert ssl[1].size == (64, 64) and ssl[1].interpolation == T.InterpolationMode.BILINEAR
    crop = build_linear_transform(config, is_train=False).transforms
    assert [type(t) for t in crop[1:]] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert crop[1].size == 96 and crop[1].interpolation == T.InterpolationMode.BILINEAR and crop[2].size == (64, 64)
    # timm's supervised recipe: DATA.INTERPOLATION, test resize to IMG_SIZE / 0.875
    config = make_config("imagenet", tmp_path, DATA__IMG_SIZE=64, AUG__SSL_LINEAR_AUG=False)
    crop = build_linear_transform(config, is_train=False).transforms
    assert crop[1].size == 73 and crop[1].interpolation == T.InterpolationMode.BICUBIC and crop[2].size == (64, 64)
    for key in ("AUG.SSL_AUG_INTERPOLATION", "DATA.INTERPOLATION"):
        lanczos = {key.replace(".", "__"): "lanczos"}
        config = make_config("imagenet", tmp_path, AUG__SSL_LINEAR_AUG=key.startswith("AUG"), **lanczos)
        with pytest.raises(ValueError, match=f"unknown {key} 'lanczos'; valid: bicubic, bilinear, nearest"):
            build_linear_transform(config, is_train=False)
    config = make_config("imagenet", tmp_path, TEST__CROP=False, AUG__SSL_LINEAR_AUG=False)
    squash = build_linear_transform(config, is_train=False).transforms
    assert [type(t) for t in squash[1:]] == [T.Resize, T.ToTensor, T.Normalize] and squash[1].size == (16, 16)
    timm_train = build_linear_transform(config, is_train=True)
    assert "ColorJitter" in repr(timm_train) and "RandomResizedCropAndInterpolation" in repr(timm_train)
    img = _image(np.random.default_rng(0), "CMYK", size=(30, 20))
    for t in (timm_train, build_linear_transform(config, is_train=False)):
        assert t(img).shape == (3, IMG_SIZE, IMG_SIZE)


def test_loaders_shard_val_exactly_and_train_evenly(tmp_path):
    write_imagenet(tmp_path, np.random.default_rng(0))  # 9 train, 6 val
    world = 4
    shards, train_lengths = [], []
    for rank in range(world):
        config = make_config("imagenet", tmp_path, DATA__BATCH_SIZE=1)
        train_set, val_set, train_loader, val_loader, _ = build_linear_loaders(config, rank=rank, world_size=world)
        assert isinstance(train_loader.sampler.sampler, DistributedSampler) and train_loader.drop_last
        assert not train_loader.pin_memory or torch.cuda.is_available()
        shards.append(list(val_loader.dataset.indices))
        train_lengths.append(len(train_loader))
        orders = []
        for epoch in (0, 1, 0):
            set_loader_epoch(train_loader, epoch)
            orders.append(list(train_loader.sampler))  # (index, augmentation seed)
        assert orders[0] == orders[2] and orders[0] != orders[1]
    assert sorted(i for shard in shards for i in shard) == list(range(6))  # no padding, no duplicate
    assert train_lengths == [2] * world  # 9 // 4 each, the rest dropped
    # one process: the whole set, reshuffled by set_epoch
    train_loader = build_linear_loaders(make_config("imagenet", tmp_path), rank=0, world_size=1)[2]
    orders = []
    for epoch in (0, 1):
        set_loader_epoch(train_loader, epoch)
        orders.append([index for index, _ in train_loader.sampler])
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(9)) and orders[0] != orders[1]
    with pytest.raises(ValueError, match="DATA.BATCH_SIZE 3 is larger"):
        build_linear_loaders(make_config("imagenet", tmp_path, DATA__BATCH_SIZE=3), rank=0, world_size=4)


def test_zip_part_cache_holds_each_rank_shard(tmp_path):
    write_imagenet(tmp_path, np.random.default_rng(0))
    config = make_config("imagenet", tmp_path, DATA__ZIP_MODE=True, DATA__CACHE_MODE="part", DATA__BATCH_SIZE=1)
    train_set, val_set, train_loader, val_loader, num_classes = build_linear_loaders(config, rank=1, world_size=2)
    assert num_classes == 3
    assert {index for index, _ in train_loader.sampler} <= set(train_set.cached_indices)
    assert set(val_set.cached_indices) <= set(val_loader.dataset.indices)


# -----------------------------------------------------------------------------
# Two processes: rank 0 builds (and may download) first, the others after it
# -----------------------------------------------------------------------------
def _dist_worker(rank, world_size, port, root, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    builder, listed = L._TRANSFER_BUILDERS["dtd"]
    events = []

    def spy(*args):
        events.append(("start", time.time(), args[-1]))
        if rank == 0:
            time.sleep(0.5)  # a slow "download"
        result = builder(*args)
        events.append(("end", time.time()))
        return result

    L._TRANSFER_BUILDERS["dtd"] = (spy, listed)
    config = make_config("dtd", root, DATA__BATCH_SIZE=1)
    train_set, val_set, train_loader, val_loader, _ = build_linear_loaders(config)
    torch.save({"events": events, "val": list(val_loader.dataset.indices), "steps": len(train_loader)}, out[rank])
    dist.destroy_process_group()


def test_rank_zero_first_order(monkeypatch):
    """Without processes: rank 1 waits before building and may not download; rank 0 releases
    the others after building, even when it fails."""
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))

    def build(may_download):
        calls.append(("build", may_download))
        return "sets"

    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    assert L._rank_zero_first(build) == "sets" and calls == ["barrier", ("build", False)]
    calls.clear()
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    assert L._rank_zero_first(build) == "sets" and calls == [("build", True), "barrier"]
    calls.clear()

    def fail(may_download):
        raise RuntimeError("download failed")

    with pytest.raises(RuntimeError):
        L._rank_zero_first(fail)
    assert calls == ["barrier"]


@pytest.mark.slow
def test_rank_zero_builds_first(tmp_path):
    write_dtd(tmp_path, np.random.default_rng(0))
    out = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    mp.spawn(_dist_worker, args=(2, free_port(), str(tmp_path), out), nprocs=2, join=True)
    r0, r1 = (torch.load(path) for path in out)
    assert r0["events"][0][2] is True and r1["events"][0][2] is False  # only rank 0 may download
    assert r1["events"][0][1] >= r0["events"][1][1]  # rank 1 starts after rank 0 finished
    assert r0["val"] == [0, 2] and r1["val"] == [1] and r0["steps"] == r1["steps"] == 3
