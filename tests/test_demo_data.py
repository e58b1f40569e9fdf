"""The demo's generated dataset: the same files for the same seed, balanced classes, and no
cue but the ink's layout (two grey levels per image, anti-aliased between them, their contrast
of either sign)."""

import os
import sys

import numpy as np
from PIL import Image

import demo
from demo import CLASSES, IMG_SIZE, MIN_CONTRAST, make_dataset


def read_split(root, split):
    """{class: [uint8 arrays]} of ``root/split``, files in name order."""
    out = {}
    for shape in sorted(os.listdir(os.path.join(root, split))):
        folder = os.path.join(root, split, shape)
        out[shape] = [np.asarray(Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder))]
    return out


def test_same_seed_same_images_and_balanced_classes(tmp_path):
    a = make_dataset(str(tmp_path / "a"), per_class_train=6, per_class_val=3, seed=1)
    b = make_dataset(str(tmp_path / "b"), per_class_train=6, per_class_val=3, seed=1)
    other = make_dataset(str(tmp_path / "c"), per_class_train=6, per_class_val=3, seed=2)
    for split, n in (("train", 6), ("val", 3)):
        images_a, images_b = read_split(a, split), read_split(b, split)
        assert sorted(images_a) == sorted(CLASSES)
        assert all(len(images) == n for images in images_a.values())
        for shape in CLASSES:
            assert all(np.array_equal(x, y) for x, y in zip(images_a[shape], images_b[shape], strict=True))
    first = read_split(a, "train")[CLASSES[0]][0]
    assert not np.array_equal(first, read_split(other, "train")[CLASSES[0]][0])


def test_images_are_two_grey_levels_with_either_sign_of_contrast(tmp_path):
    root = make_dataset(str(tmp_path / "d"), per_class_train=8, per_class_val=1, seed=0)
    brighter_ink = darker_ink = 0
    ink_area = {}  # class: [pixels of ink, edges counted by their share of the ink level]
    for shape, images in read_split(root, "train").items():
        for img in images:
            assert img.shape == (IMG_SIZE, IMG_SIZE, 3)
            assert (img == img[..., :1]).all()  # R = G = B: no colour
            grey = img[..., 0].astype(int)
            background = grey[0, 0]  # a shape never reaches a corner
            ink = grey.flat[np.abs(grey - background).argmax()]
            assert abs(ink - background) >= MIN_CONTRAST
            assert (grey >= min(ink, background)).all() and (grey <= max(ink, background)).all()
            brighter_ink += int(ink > background)
            darker_ink += int(ink < background)
            ink_area.setdefault(shape, []).append((np.abs(grey - background) / abs(ink - background)).sum())
    assert brighter_ink > 0 and darker_ink > 0
    # sizes vary, but a dot is smaller than any disc, and a ring or stripes cover less than a disc
    assert max(ink_area["dot"]) < min(ink_area["disc"])
    assert np.mean(ink_area["ring"]) < np.mean(ink_area["disc"]) > np.mean(ink_area["stripes"])


def test_data_only_writes_the_walkthroughs_folders_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["demo.py", "--data-only", "--out", str(tmp_path)])
    demo.main()
    assert os.listdir(tmp_path) == [f"grey_patterns_{IMG_SIZE}px"]  # no run folders
    root = tmp_path / f"grey_patterns_{IMG_SIZE}px"
    for split, n in (("train", 160), ("val", 40)):
        assert sorted(os.listdir(root / split)) == sorted(CLASSES)
        assert all(len(os.listdir(root / split / shape)) == n for shape in CLASSES)
