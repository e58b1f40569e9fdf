"""DAVIS 2017 semi-supervised video object segmentation: videos, frames and palette masks.

Read from ``DATA.TRANSFER_ROOT/DAVIS`` (where ``data/linear.py`` reads every dataset other than
ImageNet), in the layout of the official DAVIS-2017-trainval-480p archive::

    DAVIS/ImageSets/2017/val.txt                 one video name a line
    DAVIS/JPEGImages/480p/<video>/00000.jpg ...  the frames, in name order
    DAVIS/Annotations/480p/<video>/00000.png ... palette PNGs: 0 background, 1..N the objects,
                                                 255 unlabelled pixels

The objects of a video are the indices present in its first frame's mask (255 aside). A frame
or mask that cannot be read raises ``UnreadableImageError`` naming it.
"""

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data.cached_image_folder import UNREADABLE_ERRORS, UnreadableImageError, pil_rgb_loader

LAYOUT = (
    ("ImageSets/2017/<split>.txt", "the list of videos, one name a line"),
    ("JPEGImages/480p/<video>/<frame>.jpg", "the frames of each video"),
    ("Annotations/480p/<video>/<frame>.png", "their palette masks (at least the first frame's)"),
)
VOID = 255  # unlabelled pixels of an annotation
_ADVICE = "every frame of a video is segmented and every annotation scored: replace it"


def _missing_error(root: str, split: str, missing: str) -> FileNotFoundError:
    layout = "; ".join(f"{os.path.join(root, p.replace('<split>', split))} ({what})" for p, what in LAYOUT)
    return FileNotFoundError(
        f"DAVIS 2017 is not where DATA.TRANSFER_ROOT points: missing {missing}. Unpack DAVIS-2017-trainval-480p.zip "
        f"(davischallenge.org) there, so that it holds {layout}"
    )


@dataclass
class Video:
    """One video: its name and the paths of its frames and of their annotations (None where absent)."""

    name: str
    frames: list[str]
    annotations: list[str | None]

    def read_frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as [H, W, 3] uint8 RGB."""
        try:
            return np.array(pil_rgb_loader(self.frames[index]))
        except UNREADABLE_ERRORS as e:
            raise UnreadableImageError.of(self.frames[index], e, _ADVICE) from None

    def read_mask(self, index: int) -> tuple[np.ndarray, list[int] | None]:
        """The annotation of frame ``index``: ([H, W] uint8 palette indices, its palette: 768 ints or None)."""
        try:
            with Image.open(self.annotations[index]) as image:
                if image.mode not in ("P", "L"):
                    raise ValueError(f"{self.annotations[index]} is a {image.mode} image, not a palette mask")
                return np.asarray(image), image.getpalette()
        except UNREADABLE_ERRORS as e:
            raise UnreadableImageError.of(self.annotations[index], e, _ADVICE) from None

    def object_ids(self) -> list[int]:
        """The objects: the indices of the first frame's mask but 0 (background) and 255 (void)."""
        mask, _ = self.read_mask(0)
        return [int(i) for i in np.unique(mask) if i not in (0, VOID)]


def davis_root(transfer_root: str) -> str:
    return os.path.join(transfer_root, "DAVIS")


def read_videos(root: str, split: str) -> list[Video]:
    """The videos of ``ImageSets/2017/<split>.txt`` under ``root`` (the DAVIS folder), in the list's order.

    Raises:
        FileNotFoundError: the list, a video's frames or its first annotation is missing; the
            message names the missing path and the whole layout.
    """
    listing = os.path.join(root, "ImageSets", "2017", f"{split}.txt")
    if not os.path.isfile(listing):
        raise _missing_error(root, split, listing)
    with open(listing) as f:
        names = [line.strip() for line in f if line.strip()]
    videos = []
    for name in names:
        frame_dir = os.path.join(root, "JPEGImages", "480p", name)
        frames = sorted(f for f in os.listdir(frame_dir) if f.endswith(".jpg")) if os.path.isdir(frame_dir) else []
        if not frames:
            raise _missing_error(root, split, os.path.join(frame_dir, "*.jpg"))
        annotations = [os.path.join(root, "Annotations", "480p", name, f[: -len(".jpg")] + ".png") for f in frames]
        if not os.path.isfile(annotations[0]):
            raise _missing_error(root, split, annotations[0])
        videos.append(
            Video(
                name,
                [os.path.join(frame_dir, f) for f in frames],
                [a if os.path.isfile(a) else None for a in annotations],
            )
        )
    return videos


def write_palette_png(path: str, mask: np.ndarray, palette: list[int] | None) -> None:
    """Save [H, W] palette indices as an indexed PNG with ``palette`` (DAVIS's format; a gray
    ramp when None)."""
    image = Image.fromarray(mask.astype(np.uint8))  # mode L; a palette makes it P
    image.putpalette(palette if palette is not None else [v for i in range(256) for v in (i, i, i)])
    image.save(path)
