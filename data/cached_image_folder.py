"""Image datasets: the RGB loader shared by every mode, the folder and the zip datasets.

``LenientImageFolder`` is torchvision's ``ImageFolder`` minus what is not an image:
hidden files and folders, files of other extensions and empty class folders are
left out with one warning, instead of failing or being read as images.

Zip mode keeps ImageNet in two files, the format of the original MoBY/Swin code:

    DATA_PATH/train.zip       the images, e.g. ``n01440764/n01440764_10026.JPEG``
    DATA_PATH/train_map.txt   one line per image: ``<path inside the zip>\\t<class index>``

``CachedImageFolder`` reads that map and decodes images from the zip on demand
(cache mode 'no'), from a copy of every image's bytes in memory ('full'), or from a
copy of this rank's shard only ('part', indices ``shard_indices(n, rank, world_size)``;
anything outside the shard still falls back to the zip).

Reading an image raises one of ``UNREADABLE_ERRORS`` when its file or zip member is
damaged (a truncated file fails too: ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off); a
training loader replaces such an image by another, an evaluation set stops with
``UnreadableImageError`` naming it (``data/build.py``).
"""

import io
import logging
import os
import zipfile
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from data import zipreader

logger = logging.getLogger(__name__)

CACHE_MODES = ("no", "full", "part")

# What a damaged image file or zip member raises (a member missing from the zip is
# reported as FileNotFoundError, an OSError).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError)
UNREADABLE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError, *_ZIP_ERRORS)


class UnreadableImageError(RuntimeError):
    """An image that cannot be read where none may be skipped (an evaluation set), or too many in
    a row: the run ends with this one line (``cli.run_cli``) on the rank that met it.

    Raised in a data loader worker, it reaches the main process as ``UnreadableImageError(text)``,
    the text being torch's "Caught UnreadableImageError in DataLoader worker process N. Original
    Traceback ..." (``ExceptionWrapper.reraise``); the constructor keeps the original message, the
    last line of that text.
    """

    def __init__(self, message: str):
        if "\n" in message:
            last = message.rstrip().rsplit("\n", 1)[-1]
            mark = f"{type(self).__name__}: "
            message = last.split(mark, 1)[1] if mark in last else " ".join(message.split())
        super().__init__(message)

    @classmethod
    def of(cls, source: str, error: BaseException, advice: str = "") -> "UnreadableImageError":
        """``unreadable image <source>: <error type>: <error>[; <advice>]``, on one line."""
        reason = " ".join(str(error).split())
        return cls(f"unreadable image {source}: {type(error).__name__}: {reason}" + (f"; {advice}" if advice else ""))


# 16-bit integer modes, scaled to 8 bits rather than clipped by ``convert("RGB")``.
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_INT_MODES:
        wide = np.asarray(img.convert("I"), dtype=np.int64)
        narrow = np.clip((wide + 128) // 257, 0, 255).astype(np.uint8)
        return Image.fromarray(narrow, mode="L").convert("RGB")
    if img.mode == "F":
        narrow = np.clip(np.asarray(img), 0, 255).round().astype(np.uint8)
        return Image.fromarray(narrow, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        # Palette transparency must go through RGBA, or PIL warns on every image.
        img = img.convert("RGBA")
    return img.convert("RGB")


def pil_rgb_loader(source: str | bytes | bytearray | memoryview) -> Image.Image:
    """Decode an image file (a path, or its bytes) into an RGB ``PIL.Image``.

    L, P, CMYK, RGBA, LA and the other 8-bit modes go through ``Image.convert``
    (alpha is dropped); 16-bit grayscale (``I;16``, ``I``) is scaled to 8 bits.
    """
    stream = io.BytesIO(source) if not isinstance(source, str) else open(source, "rb")
    with stream:
        img = Image.open(stream)
        img.load()  # decode now, while the stream is open
    return _to_rgb(img)


def open_image(source: str | bytes | bytearray | memoryview) -> Image.Image:
    """Open an image file (a path, or its bytes) without decoding it: only the header is
    read, so a transform can still choose how much to decode (``Image.draft``). The file
    is read into memory first, so no file handle stays open."""
    if isinstance(source, str):
        with open(source, "rb") as f:
            source = f.read()
    return Image.open(io.BytesIO(source))


class LenientImageFolder(ImageFolder):
    """``ImageFolder`` of ``root/<class>/**/<image>`` that ignores what is not an image.

    Hidden files and folders (names starting with '.'), files without an image
    extension and class folders without images are left out, with one warning listing
    them. An empty class folder keeps its index, so targets still agree with a sibling
    folder (e.g. val/) that has images of that class.

    Raises:
        FileNotFoundError: no image at all under ``root``.
    """

    def __init__(self, root: str, transform: Callable | None = None, loader: Callable = pil_rgb_loader):
        self._ignored: list[str] = []
        super().__init__(root, transform=transform, loader=loader)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = []
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if entry.is_dir() and not entry.name.startswith("."):
                classes.append(entry.name)
            else:
                self._ignored.append(entry.name)
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        extensions = tuple(e.lower() for e in extensions or IMG_EXTENSIONS)
        is_valid_file = is_valid_file or (lambda path: path.lower().endswith(extensions))
        samples = []
        for name in sorted(class_to_idx):
            found = len(samples)
            # sorted walk and files: the order of torchvision's make_dataset
            for root, _, fnames in sorted(os.walk(os.path.join(directory, name), followlinks=True)):
                for fname in sorted(fnames):
                    path = os.path.join(root, fname)
                    rel = os.path.relpath(path, directory)
                    if any(part.startswith(".") for part in rel.split(os.sep)) or not is_valid_file(path):
                        self._ignored.append(rel)
                    else:
                        samples.append((path, class_to_idx[name]))
            if len(samples) == found:
                self._ignored.append(f"{name}{os.sep} (no images)")
        if not samples:
            raise FileNotFoundError(f"no images ({', '.join(extensions)}) found under {directory}/<class>/")
        if self._ignored:
            more = ", ..." if len(self._ignored) > 5 else ""
            logger.warning(
                f"ignored {len(self._ignored)} hidden or non-image entries under {directory}: "
                f"{', '.join(self._ignored[:5])}{more}"
            )
        return samples

    def source(self, index: int) -> str:
        """Where image ``index`` is read from, for messages."""
        return self.samples[index][0]


class UnlabelledImageFolder(LenientImageFolder):
    """Every image under ``root`` at any depth, for a training folder whose images are not sorted
    into class folders (``root/<image>``); each sample's target is 0 and ``classes`` is empty.

    Raises:
        FileNotFoundError: no image under ``root``.
    """

    def __init__(self, root: str, transform: Callable | None = None, loader: Callable = pil_rgb_loader):
        super().__init__(root, transform=transform, loader=loader)
        self.classes, self.class_to_idx = [], {}

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return [""], {"": 0}  # the root itself, walked whole

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        try:
            return super().make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty)
        except FileNotFoundError:
            raise FileNotFoundError(f"no images found under {directory}") from None


def has_class_folders(root: str) -> bool:
    """Whether ``root`` holds a folder that is not hidden: an ImageFolder's classes."""
    return any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(root))


def shard_indices(num_samples: int, rank: int, world_size: int) -> range:
    """Indices ``rank::world_size``, cut to the same length on every rank.

    Equal lengths keep every rank at the same number of batches (the shards
    drop at most ``world_size - 1`` samples, like a ``drop_last`` sampler).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    per_rank = num_samples // world_size
    return range(rank, rank + per_rank * world_size, world_size)


def read_map_file(map_path: str) -> list[tuple[str, int]]:
    """Parse ``<path inside the zip>\\t<class index>`` lines (blank lines skipped)."""
    samples = []
    with open(map_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.rsplit("\t", 1) if "\t" in line else line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
                raise ValueError(
                    f"{map_path}:{line_no}: expected '<path inside the zip>\\t<class index>', got {line!r}"
                )
            samples.append((parts[0], int(parts[1])))
    return samples


class CachedImageFolder(Dataset):
    """Images of a zip archive listed by a map file; items are ``(transform(img), target)``.

    Args:
        zip_path: the archive holding the images.
        map_path: the map file, one ``<path inside the zip>\\t<class index>`` per line.
        transform: applied to what ``loader`` returns; None returns it as it is.
        cache_mode: 'no', 'full' or 'part' (see the module docstring).
        rank, world_size: which shard 'part' caches.
        loader: image bytes -> image; by default decoded to an RGB ``PIL.Image``.
    """

    def __init__(
        self,
        zip_path: str,
        map_path: str,
        transform: Callable | None = None,
        cache_mode: str = "no",
        rank: int = 0,
        world_size: int = 1,
        loader: Callable = pil_rgb_loader,
    ):
        if cache_mode not in CACHE_MODES:
            raise ValueError(f"unknown cache mode {cache_mode!r}; valid: {', '.join(CACHE_MODES)}")
        self.zip_path = zip_path
        self.transform = transform
        self.loader = loader
        self.cache_mode = cache_mode
        self.samples = read_map_file(map_path)
        if not self.samples:
            raise ValueError(f"{map_path} lists no images")
        self.targets = [target for _, target in self.samples]

        n = len(self.samples)
        # One flat byte buffer plus offsets rather than a list of bytes objects:
        # forked workers then read it without touching (and copying) its pages.
        self._start = np.full(n, -1, dtype=np.int64)
        self._size = np.zeros(n, dtype=np.int64)
        self._buffer = np.empty(0, dtype=np.uint8)
        if cache_mode == "full":
            self._fill_cache(range(n))
        elif cache_mode == "part":
            self._fill_cache(shard_indices(n, rank, world_size))

    def _fill_cache(self, indices: range) -> None:
        # A member that is missing or cannot be read stays uncached: reading it from
        # the zip in __getitem__ then reports it like any other unreadable image.
        sizes = {}
        for index in indices:
            try:
                sizes[index] = zipreader.member_size(self.zip_path, self.samples[index][0])
            except KeyError:
                pass
        self._buffer = np.empty(sum(sizes.values()), dtype=np.uint8)
        offset = 0
        for index, size in sizes.items():
            try:
                data = zipreader.read(self.zip_path, self.samples[index][0])
            except _ZIP_ERRORS:
                continue
            self._buffer[offset : offset + size] = np.frombuffer(data, dtype=np.uint8)
            self._start[index] = offset
            self._size[index] = size
            offset += size

    @property
    def cached_indices(self) -> list[int]:
        """Indices whose bytes are held in memory."""
        return np.flatnonzero(self._start >= 0).tolist()

    def _read_bytes(self, index: int) -> bytes | memoryview:
        start = int(self._start[index])
        if start < 0:
            try:
                return zipreader.read(self.zip_path, self.samples[index][0])
            except KeyError:
                raise FileNotFoundError(f"{self.source(index)}: no such member") from None
        return memoryview(self._buffer[start : start + int(self._size[index])])

    def source(self, index: int) -> str:
        """Where image ``index`` is read from, for messages."""
        return f"{self.zip_path}:{self.samples[index][0]}"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        img = self.loader(self._read_bytes(index))
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]
