"""Datasets and loaders of linear evaluation and fine-tuning (``main_linear.py``).

``build_linear_loaders(config)`` reads ``config.DATA.DATASET``:

* ``imagenet`` and ``imagenet100``: ``DATA.DATA_PATH/{train,val}/<class>/<image>``, or with
  ``DATA.ZIP_MODE`` ``DATA_PATH/{train,val}.zip`` + ``{train,val}_map.txt`` (``CachedImageFolder``).
* transfer sets: torchvision's own dataset classes, read from ``DATA.TRANSFER_ROOT`` and
  downloaded there when missing. The train / test split of each:

  ==========================  ===========================  =====================================
  name (aliases)              train                        test
  ==========================  ===========================  =====================================
  cifar10, cifar100           train                        test
  stl10 (stl)                 train (the 5,000 labelled)   test
  flowers (oxford_flowers102) train + val                  test
  pets (oxford_pets)          trainval                     test
  food101                     train                        test
  cars (stanford_cars)        train                        test (never downloaded, see below)
  caltech101 (caltech)        30 images of each class      the rest (seeded split, see below)
  dtd                         train1 + val1 (partition 1)  test1
  aircraft (fgvc_aircraft)    trainval, 100 variants       test
  sun397                      half of each class           the rest (seeded split, see below)
  voc2007 (voc)               trainval                     test (single label, see below)
  places365 (places)          train-standard, 256 px       val, 256 px
  ==========================  ===========================  =====================================

Seeded splits (caltech101, sun397; torchvision gives no split). Each class's images are
sorted by path and shuffled by a generator seeded with ``(SPLIT_SEED, crc32(class name))``;
the first ``CALTECH101_TRAIN_PER_CLASS`` (30) images of a Caltech101 class train, the rest
test; the first ``floor(n * SUN397_TRAIN_FRACTION)`` (half, rounded down) of a SUN397 class
train, the rest test. The split depends neither on ``config.SEED`` nor on the file system's
listing order nor on the other classes, and no image is in both parts.

VOC2007 single label. The label of an image is the class of its largest object by box area
``(xmax - xmin + 1) * (ymax - ymin + 1)`` (VOC's inclusive pixel coordinates), among the
objects not marked ``difficult``, or among all objects when every one is difficult; on a
tie, the first in the annotation file. Class indices follow the sorted class names found in
the annotations of both parts, whether an image's label or not (VOC's usual alphabetical
order of the 20 classes).

Downloads. A set whose files are all present is opened with ``download=False`` (torchvision
re-downloads VOC on every ``download=True``, and a present but corrupted file - torchvision
checks the md5 of CIFAR's, STL10's, Flowers102's and Places365's files - then stops the run
instead of starting a silent multi-gigabyte download). Only rank 0 downloads: under
``torch.distributed`` the other ranks wait at a barrier until it has built its sets, then read
the files without downloading. The barrier is subject to the process group's timeout, so
download the large sets (Places365, SUN397) before a multi-process run. A download that fails
(an offline node) or files torchvision finds incomplete or damaged raise ``TransferDataError``
(a FileNotFoundError), one line naming the files torchvision reads, the archives it downloads,
their addresses and where under ``DATA.TRANSFER_ROOT`` they go (``TRANSFER_FILES``); any other
error is left as it is. Stanford Cars cannot be downloaded any more; a missing file raises
``TransferDataError`` naming it and the layout.

Unreadable images: the training set replaces one by another, the test set stops with one line
naming it (``build_linear_loaders``).

Labels are Python ints. Images of any mode (grayscale, palette, CMYK, ...) become RGB.
"""

import http.client
import os
import re
import socket
import ssl
import tarfile
import urllib.error
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch.distributed as dist
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from torchvision import datasets as tvd

from data.build import StopOnUnreadable, build_dataset, check_split, make_loader, seeded_loader
from data.cached_image_folder import CACHE_MODES, pil_rgb_loader
from data.transforms import build_linear_transform
from distributed import get_rank, get_world_size

IMAGENET_DATASETS = ("imagenet", "imagenet100")
TRANSFER_DATASETS = (
    "cifar10",
    "cifar100",
    "stl10",
    "flowers",
    "pets",
    "food101",
    "cars",
    "caltech101",
    "dtd",
    "aircraft",
    "sun397",
    "voc2007",
    "places365",
)
LINEAR_DATASETS = IMAGENET_DATASETS + TRANSFER_DATASETS
DATASET_ALIASES = {
    "oxford_flowers102": "flowers",
    "oxford_pets": "pets",
    "stanford_cars": "cars",
    "fgvc_aircraft": "aircraft",
    "caltech": "caltech101",
    "voc": "voc2007",
    "places": "places365",
    "stl": "stl10",
}

# Seed of the caltech101 and sun397 splits; fixed so every run evaluates on the same images
SPLIT_SEED = 0
CALTECH101_TRAIN_PER_CLASS = 30
SUN397_TRAIN_FRACTION = 0.5

Transform = Callable | None


def canonical_dataset_name(name: str) -> str:
    """The dataset ``name`` stands for (aliases resolved, case ignored).

    Raises:
        ValueError: an unknown name; the message lists the valid names and aliases.
    """
    key = DATASET_ALIASES.get(name.lower(), name.lower())
    if key not in LINEAR_DATASETS:
        aliases = ", ".join(f"{alias} ({target})" for alias, target in DATASET_ALIASES.items())
        raise ValueError(f"unknown DATA.DATASET {name!r}; valid: {', '.join(LINEAR_DATASETS)}; aliases: {aliases}")
    return key


# -----------------------------------------------------------------------------
# Helpers shared by the builders
# -----------------------------------------------------------------------------
def dataset_targets(dataset: Dataset) -> list[int]:
    """The label of every sample of ``dataset``, in order, without decoding any image."""
    if isinstance(dataset, Subset):
        targets = dataset_targets(dataset.dataset)
        return [targets[i] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        return [t for part in dataset.datasets for t in dataset_targets(part)]
    if isinstance(dataset, tvd.StanfordCars):
        return [int(target) for _, target in dataset._samples]
    for attr in ("targets", "_labels", "labels", "y"):  # the attribute differs between classes
        values = getattr(dataset, attr, None)
        if values is not None:
            return [int(v) for v in values]
    raise TypeError(f"cannot read the labels of a {type(dataset).__name__}")


def _class_names(dataset: Dataset) -> list[str] | None:
    """The class list the dataset read from its files, or None."""
    if isinstance(dataset, Subset):
        return _class_names(dataset.dataset)
    if isinstance(dataset, ConcatDataset):
        names = [_class_names(part) for part in dataset.datasets]
        if any(n != names[0] for n in names[1:]):
            raise ValueError(f"the parts of a {type(dataset.datasets[0]).__name__} training set disagree on classes")
        return names[0]
    classes = getattr(dataset, "classes", getattr(dataset, "categories", None))  # Caltech101: categories
    return list(classes) if classes is not None else None


def count_classes(train_set: Dataset, test_set: Dataset, listed: bool = True) -> int:
    """Number of classes: the length of the class list read from the files when ``listed``
    and the sets have one, else the largest label of both sets + 1.

    Raises:
        ValueError: train and test list different classes (their indices would not agree),
            or a label lies outside the class list.
    """
    labels = dataset_targets(train_set) + dataset_targets(test_set)
    if not labels:
        raise ValueError("the dataset holds no images")
    num_labelled = max(labels) + 1
    train_names, test_names = _class_names(train_set), _class_names(test_set)
    if not listed or train_names is None:
        return num_labelled
    if test_names is not None and test_names != train_names:
        only_train = sorted(set(train_names) - set(test_names))
        only_test = sorted(set(test_names) - set(train_names))
        raise ValueError(
            "the training and test sets list different classes, so their label indices disagree "
            f"(only in train: {only_train}; only in test: {only_test})"
        )
    if num_labelled > len(train_names) or min(labels) < 0:
        raise ValueError(f"labels span 0..{num_labelled - 1} but the dataset lists {len(train_names)} classes")
    return len(train_names)


def _missing(root: str, paths: Sequence[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(os.path.join(root, p))]


def _download(may_download: bool, root: str, *paths: str) -> bool:
    """Download only where allowed and some of ``paths`` (relative to ``root``) is missing."""
    return may_download and bool(_missing(root, paths))


def seeded_class_split(
    keys: Sequence[str], class_names: Sequence[str], num_train: Callable[[str, int], int], seed: int = SPLIT_SEED
) -> tuple[list[int], list[int]]:
    """Split sample indices into (train, test), class by class.

    Each class's samples are sorted by ``keys`` (stable identities such as relative
    paths) and shuffled by a generator seeded with ``(seed, crc32(class name))``; the
    first ``num_train(class name, class size)`` go to train. Both lists are sorted.
    """
    by_class: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for index, (key, name) in enumerate(zip(keys, class_names, strict=True)):
        by_class[name].append((key, index))
    train, test = [], []
    for name, members in by_class.items():
        members.sort()
        order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(len(members))
        k = num_train(name, len(members))
        train += [members[j][1] for j in order[:k]]
        test += [members[j][1] for j in order[k:]]
    return sorted(train), sorted(test)


def _rgb_loader(path: str | os.PathLike) -> Image.Image:
    """``pil_rgb_loader`` for the ``pathlib.Path`` objects torchvision's classes pass."""
    return pil_rgb_loader(os.fspath(path))


class ImageList(Dataset):
    """Images given by path, each with an integer target; items are ``(transform(rgb), target)``."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], transform: Transform = None):
        self.samples = list(samples)
        self.targets = [target for _, target in self.samples]
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = pil_rgb_loader(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


# -----------------------------------------------------------------------------
# VOC2007: detection annotations -> one label per image
# -----------------------------------------------------------------------------
def voc_objects(xml_path: str) -> list[tuple[str, float, bool]]:
    """``(class name, box area, difficult)`` of every object of a VOC annotation file."""
    objects = []
    for obj in ET.parse(xml_path).getroot().iter("object"):
        box = obj.find("bndbox")
        x1, y1, x2, y2 = (float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        area = (x2 - x1 + 1) * (y2 - y1 + 1)
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        objects.append((obj.findtext("name").strip(), area, difficult))
    return objects


def voc_single_label(objects: Sequence[tuple[str, float, bool]]) -> str:
    """The class of the largest object that is not difficult (of all objects when all are
    difficult); the first such object on a tie."""
    if not objects:
        raise ValueError("a VOC image without objects has no label")
    candidates = [o for o in objects if not o[2]] or list(objects)
    return max(candidates, key=lambda o: o[1])[0]


# -----------------------------------------------------------------------------
# Transfer sets: each builder returns (train set, test set)
# -----------------------------------------------------------------------------
def _cifar(cls, folder):
    def build(root, train_t, test_t, may_download):
        download = _download(may_download, root, folder)
        return (
            cls(root, train=True, transform=train_t, target_transform=int, download=download),
            cls(root, train=False, transform=test_t, target_transform=int, download=download),
        )

    return build


def _stl10(root, train_t, test_t, may_download):
    download = _download(may_download, root, "stl10_binary")
    return (
        tvd.STL10(root, split="train", transform=train_t, target_transform=int, download=download),
        tvd.STL10(root, split="test", transform=test_t, target_transform=int, download=download),
    )


def _flowers(root, train_t, test_t, may_download):
    download = _download(may_download, root, "flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat")
    common = dict(target_transform=int, download=download, loader=_rgb_loader)
    train = ConcatDataset([tvd.Flowers102(root, split=s, transform=train_t, **common) for s in ("train", "val")])
    return train, tvd.Flowers102(root, split="test", transform=test_t, **common)


def _pets(root, train_t, test_t, may_download):
    download = _download(may_download, root, "oxford-iiit-pet/images", "oxford-iiit-pet/annotations")
    return (
        tvd.OxfordIIITPet(root, split="trainval", transform=train_t, target_transform=int, download=download),
        tvd.OxfordIIITPet(root, split="test", transform=test_t, target_transform=int, download=download),
    )


def _food101(root, train_t, test_t, may_download):
    download = _download(may_download, root, "food-101/images", "food-101/meta")
    common = dict(target_transform=int, download=download, loader=_rgb_loader)
    return (
        tvd.Food101(root, split="train", transform=train_t, **common),
        tvd.Food101(root, split="test", transform=test_t, **common),
    )


CARS_LAYOUT = (
    ("stanford_cars/devkit/cars_meta.mat", "the class names, from car_devkit.tgz"),
    ("stanford_cars/devkit/cars_train_annos.mat", "the training annotations, from car_devkit.tgz"),
    ("stanford_cars/cars_train", "folder of the 8,144 training images <fname>.jpg (cars_train.tgz)"),
    ("stanford_cars/cars_test_annos_withlabels.mat", "the test annotations with their labels"),
    ("stanford_cars/cars_test", "folder of the 8,041 test images <fname>.jpg (cars_test.tgz)"),
)


def _cars(root, train_t, test_t, may_download):
    missing = _missing(root, [path for path, _ in CARS_LAYOUT])
    if missing:
        root = os.path.abspath(root)
        layout = ", ".join(f"{os.path.join(root, path)} ({what})" for path, what in CARS_LAYOUT)
        raise TransferDataError(
            f"cars is not under {root} (DATA.TRANSFER_ROOT) and can no longer be downloaded (its original address "
            f"is gone): place its files where torchvision's StanfordCars reads them: {layout}; "
            f"missing: {', '.join(os.path.join(root, path) for path in missing)}"
        )
    common = dict(target_transform=int, loader=_rgb_loader)
    return (
        tvd.StanfordCars(root, split="train", transform=train_t, **common),
        tvd.StanfordCars(root, split="test", transform=test_t, **common),
    )


def _caltech101_train_count(name: str, size: int) -> int:
    if size <= CALTECH101_TRAIN_PER_CLASS:
        raise ValueError(
            f"caltech101 class {name!r} has {size} images; the split trains on {CALTECH101_TRAIN_PER_CLASS} "
            "of each class and tests on the rest, so every class needs more (is the download complete?)"
        )
    return CALTECH101_TRAIN_PER_CLASS


def _caltech101(root, train_t, test_t, may_download):
    download = _download(may_download, root, "caltech101/101_ObjectCategories")
    train = tvd.Caltech101(root, transform=train_t, target_transform=int, download=download)
    test = tvd.Caltech101(root, transform=test_t, target_transform=int)
    names = [train.categories[y] for y in train.y]
    keys = [f"{name}/image_{i:04d}.jpg" for name, i in zip(names, train.index, strict=True)]
    train_idx, test_idx = seeded_class_split(keys, names, _caltech101_train_count)
    return Subset(train, train_idx), Subset(test, test_idx)


def _dtd(root, train_t, test_t, may_download):
    download = _download(may_download, root, "dtd/dtd")
    common = dict(partition=1, target_transform=int, download=download, loader=_rgb_loader)
    train = ConcatDataset([tvd.DTD(root, split=s, transform=train_t, **common) for s in ("train", "val")])
    return train, tvd.DTD(root, split="test", transform=test_t, **common)


def _aircraft(root, train_t, test_t, may_download):
    download = _download(may_download, root, "fgvc-aircraft-2013b")
    common = dict(annotation_level="variant", target_transform=int, download=download, loader=_rgb_loader)
    return (
        tvd.FGVCAircraft(root, split="trainval", transform=train_t, **common),
        tvd.FGVCAircraft(root, split="test", transform=test_t, **common),
    )


def _sun397_split(dataset: tvd.SUN397) -> tuple[list[int], list[int]]:
    keys = [path.relative_to(dataset._data_dir).as_posix() for path in dataset._image_files]
    names = [dataset.classes[label] for label in dataset._labels]
    return seeded_class_split(keys, names, lambda _, size: int(size * SUN397_TRAIN_FRACTION))


def _sun397(root, train_t, test_t, may_download):
    download = _download(may_download, root, "SUN397")
    common = dict(target_transform=int, loader=_rgb_loader)
    # two listings: each part is taken from its own by path, whatever order rglob gave
    train = tvd.SUN397(root, transform=train_t, download=download, **common)
    test = tvd.SUN397(root, transform=test_t, **common)
    return Subset(train, _sun397_split(train)[0]), Subset(test, _sun397_split(test)[1])


def _voc2007(root, train_t, test_t, may_download):
    parts = {}
    for image_set in ("trainval", "test"):
        split_file = f"VOCdevkit/VOC2007/ImageSets/Main/{image_set}.txt"
        download = _download(may_download, root, split_file, "VOCdevkit/VOC2007/Annotations")
        voc = tvd.VOCDetection(root, year="2007", image_set=image_set, download=download)
        parts[image_set] = (voc.images, [voc_objects(path) for path in voc.annotations])
    # every class named in either part, whether or not it is ever an image's label
    classes = sorted({obj[0] for _, objects in parts.values() for image in objects for obj in image})
    index = {name: i for i, name in enumerate(classes)}
    return tuple(
        ImageList(
            [(path, index[voc_single_label(objects)]) for path, objects in zip(*parts[image_set], strict=True)],
            classes,
            transform,
        )
        for image_set, transform in (("trainval", train_t), ("test", test_t))
    )


def _places365(root, train_t, test_t, may_download):
    needed = {
        "train-standard": ["categories_places365.txt", "places365_train_standard.txt", "data_256_standard"],
        "val": ["categories_places365.txt", "places365_val.txt", "val_256"],
    }
    return tuple(
        tvd.Places365(
            root,
            split=split,
            small=True,
            download=_download(may_download, root, *needed[split]),
            transform=transform,
            target_transform=int,
            loader=_rgb_loader,
        )
        for split, transform in (("train-standard", train_t), ("val", test_t))
    )


# name -> (builder, whether num_classes is the length of the class list the files give)
_TRANSFER_BUILDERS = {
    "cifar10": (_cifar(tvd.CIFAR10, "cifar-10-batches-py"), True),
    "cifar100": (_cifar(tvd.CIFAR100, "cifar-100-python"), True),
    "stl10": (_stl10, True),  # class_names.txt, when present
    "flowers": (_flowers, False),  # torchvision hard-codes the 102 names; count the labels
    "pets": (_pets, True),
    "food101": (_food101, True),
    "cars": (_cars, True),
    "caltech101": (_caltech101, True),
    "dtd": (_dtd, True),
    "aircraft": (_aircraft, True),
    "sun397": (_sun397, True),
    "voc2007": (_voc2007, True),
    "places365": (_places365, True),
}


# -----------------------------------------------------------------------------
# Downloads that fail: one line saying where the files go
# -----------------------------------------------------------------------------
_VGG = "https://www.robots.ox.ac.uk/~vgg/data"
_PLACES = "http://data.csail.mit.edu/places/places365"
# name -> (what torchvision reads under DATA.TRANSFER_ROOT once unpacked, the files it downloads: (where under
# DATA.TRANSFER_ROOT it looks for each, its address)), as torchvision's dataset classes define them. A file put
# at its place by hand is checked (its md5, where torchvision knows it) and unpacked instead of downloaded.
TRANSFER_FILES = {
    "cifar10": (
        ["cifar-10-batches-py/"],
        [("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")],
    ),
    "cifar100": (
        ["cifar-100-python/"],
        [("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz")],
    ),
    "stl10": (
        ["stl10_binary/"],
        [("stl10_binary.tar.gz", "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz")],
    ),
    "flowers": (
        ["flowers-102/jpg/", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"],
        [(f"flowers-102/{f}", f"{_VGG}/flowers/102/{f}") for f in ("102flowers.tgz", "imagelabels.mat", "setid.mat")],
    ),
    "pets": (
        ["oxford-iiit-pet/images/", "oxford-iiit-pet/annotations/"],
        [(f"oxford-iiit-pet/{f}", f"{_VGG}/pets/data/{f}") for f in ("images.tar.gz", "annotations.tar.gz")],
    ),
    "food101": (
        ["food-101/images/", "food-101/meta/"],
        [("food-101.tar.gz", "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz")],
    ),
    "caltech101": (
        ["caltech101/101_ObjectCategories/"],
        [("caltech101/caltech-101.zip", "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip")],
    ),
    "dtd": (["dtd/dtd/"], [("dtd/dtd-r1.0.1.tar.gz", f"{_VGG}/dtd/download/dtd-r1.0.1.tar.gz")]),
    "aircraft": (
        ["fgvc-aircraft-2013b/"],
        [("fgvc-aircraft-2013b.tar.gz", f"{_VGG}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz")],
    ),
    "sun397": (["SUN397/"], [("SUN397.tar.gz", "http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz")]),
    "voc2007": (
        ["VOCdevkit/VOC2007/"],
        [
            (f, f"https://thor.robots.ox.ac.uk/pascal/VOC/voc2007/{f}")
            for f in ("VOCtrainval_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar")
        ],
    ),
    "places365": (
        [
            "categories_places365.txt",
            "places365_train_standard.txt",
            "places365_val.txt",
            "data_256_standard/",
            "val_256/",
        ],
        [
            (f, f"{_PLACES}/{f}")
            for f in ("filelist_places365-standard.tar", "train_256_places365standard.tar", "val_256.tar")
        ],
    ),
}

# What a download that fails raises: no network or name resolution, a refused or broken connection, an HTTP error.
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.herror,
                  socket.gaierror, ssl.SSLError)  # fmt: skip
# What files that are missing or damaged raise: a damaged archive, and torchvision's own checks (RuntimeError
# "Dataset not found or corrupted", "File not found or corrupted.", ...), told apart from other RuntimeErrors by
# their message.
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError)
_TORCHVISION_FILE_CHECK = re.compile(r"not found|corrupted|does not exist|gdown")


class TransferDataError(FileNotFoundError):
    """A transfer set that is not under DATA.TRANSFER_ROOT and cannot be downloaded, or that is
    incomplete or damaged there; the message, one line, says where its files go and where from."""


def _listing(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def unavailable_error(name: str, root: str, error: Exception) -> TransferDataError | None:
    """The one-line error for ``error``, met while building the transfer set ``name`` under ``root``,
    when it is a failed download or missing or damaged files; None for any other error (a bug)."""
    if not isinstance(error, NETWORK_ERRORS + ARCHIVE_ERRORS + (RuntimeError,)) or name not in TRANSFER_FILES:
        return None
    if isinstance(error, RuntimeError) and not _TORCHVISION_FILE_CHECK.search(str(error)):
        return None
    root = os.path.abspath(root)
    needed, files = TRANSFER_FILES[name]
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    if isinstance(error, NETWORK_ERRORS):
        problem = f"is not under {root} (DATA.TRANSFER_ROOT) and could not be downloaded ({reason})"
    else:
        problem = f"is incomplete or damaged under {root} (DATA.TRANSFER_ROOT) ({reason})"
    needed = [os.path.join(root, path) for path in needed]
    present = [path for path in needed if os.path.exists(path)]
    remove = f"remove {_listing(present)}, then " if present and not isinstance(error, NETWORK_ERRORS) else ""
    it = "it" if len(files) == 1 else "them"
    return TransferDataError(
        f"{name} {problem}: {remove}on a machine with internet access fetch {_listing([url for _, url in files])} "
        f"and put {it} at {_listing([os.path.join(root, path) for path, _ in files])}; the next run checks and "
        f"unpacks {it} (or unpack {it} there yourself, so that {_listing(needed)} "
        f"{'exists' if len(needed) == 1 else 'exist'})"
    )


def _rank_zero_first(build: Callable[[bool], tuple]) -> tuple:
    """``build(may_download)`` on rank 0 first, then on the other ranks with downloads off."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return build(True)
    if dist.get_rank() != 0:
        dist.barrier()
        return build(False)
    try:
        return build(True)
    finally:  # also on failure, so the other ranks stop with their own error rather than hang
        dist.barrier()


def build_transfer_sets(name: str, root: str, train_t: Transform, test_t: Transform) -> tuple[Dataset, Dataset, int]:
    """(train set, test set, number of classes) of the transfer set ``name`` under ``root``.

    Raises:
        TransferDataError: its files are missing and cannot be downloaded (offline, or Stanford
            Cars), or are damaged; one line naming the files, their places and addresses.
    """
    name = canonical_dataset_name(name)
    if name not in _TRANSFER_BUILDERS:
        raise ValueError(f"{name} is not a transfer set; transfer sets: {', '.join(TRANSFER_DATASETS)}")
    builder, listed = _TRANSFER_BUILDERS[name]
    root = os.path.expanduser(str(root))
    try:
        train_set, test_set = _rank_zero_first(lambda may_download: builder(root, train_t, test_t, may_download))
    except (*NETWORK_ERRORS, *ARCHIVE_ERRORS, RuntimeError) as e:
        error = unavailable_error(name, root, e)
        if error is None:
            raise
        raise error from None
    return train_set, test_set, count_classes(train_set, test_set, listed)


# -----------------------------------------------------------------------------
# ImageNet (folders or zips)
# -----------------------------------------------------------------------------
# -----------------------------------------------------------------------------
# The entry point
# -----------------------------------------------------------------------------
def check_imagenet_files(config) -> None:
    """Raise FileNotFoundError naming the layout when DATA.DATASET is an ImageNet set and its train or
    val split is missing (transfer sets are checked, or downloaded, when they are built)."""
    if canonical_dataset_name(config.DATA.DATASET) in IMAGENET_DATASETS:
        for split in ("train", "val"):
            check_split(config, split)


def per_class_subset(targets: Sequence[int], per_class: int) -> list[int]:
    """Sorted indices of at most ``per_class`` samples of each class, spread evenly over the
    class's samples in dataset order (a pure function of the labels: every run and rank picks
    the same). ``per_class`` 0: every index."""
    if per_class <= 0:
        return list(range(len(targets)))
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, target in enumerate(targets):
        by_class[target].append(index)
    picked = []
    for members in by_class.values():
        take = min(per_class, len(members))
        picked += [members[j] for j in np.linspace(0, len(members) - 1, take).round().astype(int)]
    return sorted(picked)


def build_linear_loaders(
    config, rank: int | None = None, world_size: int | None = None, for_features: bool = False,
    bank_per_class: int = 0, persistent: bool = True,
) -> tuple[Dataset, Dataset, DataLoader, DataLoader, int]:  # fmt: skip
    """``(train_set, val_set, train_loader, val_loader, num_classes)`` of ``config.DATA.DATASET``.

    Batches are ``([B, 3, IMG_SIZE, IMG_SIZE] float, [B] int64)``. ``rank`` and
    ``world_size`` default to those of ``torch.distributed`` (0 and 1 without it).

    * train: this rank's share of a ``DistributedSampler`` (shuffled, seeded with
      ``config.SEED``, ``drop_last`` so every rank runs the same number of steps; with a
      zip 'part' cache, the rank's cached shard, reshuffled each epoch), full batches only,
      made as the pretraining loader is (``data.build.seeded_loader``): each sample augmented
      with its own seed, an unreadable image replaced by another with a warning and counted
      (``skipped_samples``). Call ``set_loader_epoch(train_loader, epoch)`` before each epoch.
    * val: the samples ``rank, rank + world_size, ...`` of ``val_set`` in order, without
      padding or duplicates, so per-rank counts of correct predictions sum to the exact
      accuracy over ``val_set``; an unreadable image raises ``UnreadableImageError`` naming
      it (``data.build.StopOnUnreadable``).
    * ``for_features`` (k-NN): the train loader is made like the val loader, with the
      test transform, so every training image is seen once, in order; with ``bank_per_class``
      only that many of each class (``per_class_subset``), and ``train_set`` is that subset.
    * ``persistent``: the loaders keep their workers between passes.

    Raises:
        ValueError: an unknown dataset, interpolation or cache mode, or a batch larger
            than this rank's share of the training set.
        FileNotFoundError: ImageNet folders or zips are missing; a transfer set is missing and
            cannot be downloaded (``TransferDataError``).
    """
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if rank is None:
        rank, world_size = get_rank(), get_world_size()
    name = canonical_dataset_name(config.DATA.DATASET)
    if name in IMAGENET_DATASETS and config.DATA.ZIP_MODE and config.DATA.CACHE_MODE not in CACHE_MODES:
        raise ValueError(f"unknown DATA.CACHE_MODE {config.DATA.CACHE_MODE!r}; valid: {', '.join(CACHE_MODES)}")

    test_t = build_linear_transform(config, is_train=False)
    train_t = test_t if for_features else build_linear_transform(config, is_train=True)
    if name in IMAGENET_DATASETS:
        train_set = build_dataset(config, train_t, rank, world_size, split="train")
        val_set = build_dataset(config, test_t, rank, world_size, split="val")
        num_classes = count_classes(train_set, val_set)
    else:
        train_set, val_set, num_classes = build_transfer_sets(name, config.DATA.TRANSFER_ROOT, train_t, test_t)

    val_shard = Subset(StopOnUnreadable(val_set), range(rank, len(val_set), world_size))
    val_loader = make_loader(config, val_shard, persistent=persistent)
    if for_features:
        if bank_per_class:
            train_set = Subset(train_set, per_class_subset(dataset_targets(train_set), bank_per_class))
        train_shard = Subset(StopOnUnreadable(train_set), range(rank, len(train_set), world_size))
        return train_set, val_set, make_loader(config, train_shard, persistent=persistent), val_loader, num_classes

    train_loader = seeded_loader(config, train_set, rank, world_size)
    batch_size, share = config.DATA.BATCH_SIZE, len(train_loader.sampler)
    if share < batch_size:
        raise ValueError(
            f"DATA.BATCH_SIZE {batch_size} is larger than this process's {share} training images "
            f"({name}: {len(train_set)} over {world_size} processes); lower DATA.BATCH_SIZE"
        )
    return train_set, val_set, train_loader, val_loader, num_classes
