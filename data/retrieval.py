"""Revisited Oxford 5k and Paris 6k (Radenović et al., CVPR 2018), read as the benchmark ships them.

Layout under ``DATA.TRANSFER_ROOT`` (``RETRIEVAL_LAYOUT``)::

    roxford5k/gnd_roxford5k.pkl     the ground truth
    roxford5k/jpg/<name>.jpg        every image named in it
    rparis6k/...                    likewise

``gnd_<name>.pkl`` is a pickled dict: ``imlist`` (the database images' names, without ``.jpg``),
``qimlist`` (the queries'), and ``gnd``, one dict per query: ``bbx`` its box [x1, y1, x2, y2] in
pixels of its image, and ``easy``, ``hard``, ``junk``, indices into ``imlist``. Unpickling it
allows only containers, numbers, strings and numpy arrays, so a tampered file runs no code.

Items are ``(image [3, H, W] normalised with the ImageNet mean and std, index)``. A query is
first cropped to its box (the protocol's rule; ``crop=False`` feeds it whole); every image is
then shrunk so its longer side is at most ``max_side``, aspect kept and never enlarged (the
size PIL's ``thumbnail``, which DINO's evaluation uses, gives), and resized to the size nearest
to that which the encoder takes (``fit_size``): one Lanczos resampling in all.

An image that cannot be read (its header, when the loader sorts the images by size, or its
pixels) raises ``UnreadableImageError`` naming it: the benchmark is measured over every image.
"""

import os
import pickle
from collections import defaultdict
from collections.abc import Callable, Sequence

from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from data.cached_image_folder import UNREADABLE_ERRORS, UnreadableImageError, pil_rgb_loader
from data.photometric import IMAGENET_MEAN, IMAGENET_STD

RETRIEVAL_DATASETS = ("roxford5k", "rparis6k")
ARCHIVES = {"roxford5k": "oxbuild_images-v1.tgz", "rparis6k": "paris_1-v1.tgz and paris_2-v1.tgz, flattened"}
SIZES = {"roxford5k": "4,993 database images and 70 queries", "rparis6k": "6,322 database images and 70 queries"}


def retrieval_layout(name: str) -> list[tuple[str, str]]:
    """(path under DATA.TRANSFER_ROOT, what it holds) of each file ``name`` needs."""
    return [
        (f"{name}/gnd_{name}.pkl", "the revisited ground truth (imlist, qimlist, gnd) from cmp.felk.cvut.cz/revisitop"),
        (f"{name}/jpg", f"folder of every image it names, <name>.jpg ({SIZES[name]}; {ARCHIVES[name]})"),
    ]


def check_retrieval_name(name: str) -> str:
    """``name`` lower-cased; ValueError naming the valid sets when it is not one."""
    if name.lower() not in RETRIEVAL_DATASETS:
        raise ValueError(f"DATA.DATASET {name!r} is not a retrieval set; valid: {', '.join(RETRIEVAL_DATASETS)}")
    return name.lower()


def _missing_error(name: str, root: str, missing: Sequence[str]) -> FileNotFoundError:
    layout = "\n".join(f"  {os.path.join(root, path)}  - {what}" for path, what in retrieval_layout(name))
    return FileNotFoundError(
        f"{name} is not under {root} (DATA.TRANSFER_ROOT): place the benchmark's files in this layout:\n{layout}\n"
        f"missing: {', '.join(missing)}"
    )


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles containers, numbers, strings and numpy arrays; refuses every other class or function."""

    ALLOWED = {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    } | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_ground_truth(root: str, name: str) -> dict:
    """``{"imlist", "qimlist", "gnd"}`` of the set ``name`` under ``root``, its images checked.

    Raises:
        FileNotFoundError: a file or image is missing; the message gives the layout.
        ValueError: the pickle holds something else than the benchmark's ground truth.
    """
    root = os.path.expanduser(root)
    paths = [os.path.join(root, path) for path, _ in retrieval_layout(name)]
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise _missing_error(name, root, missing)
    path = os.path.join(root, name, f"gnd_{name}.pkl")
    with open(path, "rb") as f:
        try:
            data = _PlainUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"refused to read {path}: it pickles {e}, which no revisited ground truth does") from None
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise ValueError(f"{path} is not a revisited ground truth: it needs the keys imlist, qimlist and gnd")
    if len(data["gnd"]) != len(data["qimlist"]):
        raise ValueError(f"{path}: {len(data['gnd'])} gnd entries for {len(data['qimlist'])} queries")
    names = sorted(set(data["imlist"]) | set(data["qimlist"]))
    absent = [n for n in names if not os.path.isfile(image_path(root, name, n))]
    if absent:
        shown = ", ".join(image_path(root, name, n) for n in absent[:3])
        raise _missing_error(name, root, [f"{len(absent)} of its {len(names)} images ({shown}, ...)"])
    return data


def image_path(root: str, name: str, image: str) -> str:
    return os.path.join(root, name, "jpg", f"{image}.jpg")


def shrunk_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is at most ``max_side``, aspect kept, never enlarged."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class RetrievalImages(Dataset):
    """Database images or queries of a retrieval set; items ``(image [3, H, W], index)``.

    Args:
        paths: the image files.
        boxes: per image, its box [x1, y1, x2, y2] (a query, cropped to it) or None.
        max_side: the longer side an image is shrunk to, at most.
        fit_size: (h, w) -> the nearest (H, W) the encoder takes.
    """

    def __init__(self, paths: Sequence[str], boxes: Sequence, max_side: int, fit_size: Callable):
        self.paths, self.boxes = list(paths), list(boxes)
        self.max_side, self.fit_size = max_side, fit_size
        self.normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    @classmethod
    def database(cls, root, name, ground_truth, max_side, fit_size):
        paths = [image_path(root, name, n) for n in ground_truth["imlist"]]
        return cls(paths, [None] * len(paths), max_side, fit_size)

    @classmethod
    def queries(cls, root, name, ground_truth, max_side, fit_size, crop=True):
        paths = [image_path(root, name, n) for n in ground_truth["qimlist"]]
        boxes = [[float(v) for v in g["bbx"]] if crop else None for g in ground_truth["gnd"]]
        return cls(paths, boxes, max_side, fit_size)

    def __len__(self) -> int:
        return len(self.paths)

    def _box(self, index: int, width: int, height: int) -> tuple[int, int, int, int] | None:
        """The query's box in whole pixels (rounded as PIL's crop rounds), inside the image."""
        box = self.boxes[index]
        if box is None:
            return None
        x1, y1, x2, y2 = (round(v) for v in box)
        x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
        return x1, y1, min(max(x2, x1 + 1), width), min(max(y2, y1 + 1), height)

    def input_size(self, index: int, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """(H, W) image ``index`` is fed at; ``image_size``: its (width, height), else read from its header."""
        if image_size is None:
            try:
                with Image.open(self.paths[index]) as img:
                    image_size = img.size
            except UNREADABLE_ERRORS as e:
                raise self._unreadable(index, e) from None
        box = self._box(index, *image_size)
        width, height = (box[2] - box[0], box[3] - box[1]) if box else image_size
        width, height = shrunk_size(width, height, self.max_side)
        return tuple(self.fit_size(height, width))

    def _unreadable(self, index: int, error: Exception) -> UnreadableImageError:
        return UnreadableImageError.of(
            self.paths[index], error, "the benchmark is measured over every image: replace it"
        )

    def __getitem__(self, index: int):
        try:
            img = pil_rgb_loader(self.paths[index])
        except UNREADABLE_ERRORS as e:
            raise self._unreadable(index, e) from None
        height, width = self.input_size(index, img.size)
        box = self._box(index, *img.size)
        if box is not None:
            img = img.crop(box)
        img = img.resize((width, height), Image.Resampling.LANCZOS)
        return self.normalize(img), index


def retrieval_loader(
    dataset: RetrievalImages, rank: int, world_size: int, batch_size: int, num_workers: int, pin_memory: bool
) -> tuple[DataLoader, list[int]]:
    """A loader over this rank's images ``rank, rank + world_size, ...``, in batches of one input
    size each, and the dataset index of each image in the order it yields them."""
    by_size = defaultdict(list)
    for index in range(rank, len(dataset), world_size):
        by_size[dataset.input_size(index)].append(index)
    batches = [
        group[start : start + batch_size]
        for _, group in sorted(by_size.items())
        for start in range(0, len(group), batch_size)
    ]
    loader = DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False
    )
    return loader, [index for batch in batches for index in batch]
