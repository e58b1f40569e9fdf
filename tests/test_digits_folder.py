"""tools/digits_folder.py: scikit-learn's digits as train/ and val/ folders, with scikit-learn's
loader replaced by one of the same shape (scikit-learn is not among the requirements)."""

import os
import sys
import types

import numpy as np
import pytest
from PIL import Image

from tools import digits_folder


@pytest.fixture
def fake_sklearn(monkeypatch):
    """``sklearn.datasets.load_digits`` returning 10 classes of 8 x 8 images with values 0..16 (as
    scikit-learn's): image i is filled with the value i % 17."""
    n = 50  # 5 of each class
    images = np.stack([np.full((8, 8), i % 17, dtype=np.float64) for i in range(n)])
    datasets = types.ModuleType("sklearn.datasets")
    datasets.load_digits = lambda: types.SimpleNamespace(images=images, target=np.arange(n) % 10)
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.datasets", datasets)
    return images


def test_each_class_splits_by_the_fraction_and_ink_is_dark(fake_sklearn, tmp_path):
    counts = digits_folder.write_digits(str(tmp_path), size=16, val_fraction=0.4)
    assert counts == {"train": 30, "val": 20}
    names = {}
    for split in ("train", "val"):
        assert sorted(os.listdir(tmp_path / split)) == [str(c) for c in range(10)]
        for c in range(10):
            files = sorted(os.listdir(tmp_path / split / str(c)))
            assert len(files) == (2 if split == "val" else 3)
            names[split, c] = files
            for name in files:
                index = int(name[:4])
                assert index % 10 == c  # the image of that class
                pixels = np.asarray(Image.open(tmp_path / split / str(c) / name))
                assert pixels.shape == (16, 16)
                # value v of 0..16 -> 255 - v * 255 / 16: blank paper white, full ink black
                assert pixels.min() == pixels.max() == round(255 - (index % 17) * 255 / 16)
    assert not set(names["train", 3]) & set(names["val", 3])
    again = digits_folder.write_digits(str(tmp_path / "again"), size=16, val_fraction=0.4)
    assert again == counts and sorted(os.listdir(tmp_path / "again" / "val" / "3")) == names["val", 3]  # seeded


def test_without_scikit_learn_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import fails
    with pytest.raises(SystemExit) as stop:
        digits_folder.main(["--out", str(tmp_path)])
    assert "pip install scikit-learn" in str(stop.value)


def test_wrong_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        digits_folder.main(["--out", str(tmp_path), "--val-fraction", "1.5"])
    assert stop.value.code == 2 and "--val-fraction" in capsys.readouterr().err
