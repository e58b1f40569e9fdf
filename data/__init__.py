"""Data: two-view pretraining loaders, and the loaders of linear evaluation and k-NN."""

from data.build import build_loader, set_loader_epoch, skipped_samples
from data.linear import build_linear_loaders
from data.photometric import DeviceAugment, DeviceViews

__all__ = [
    "DeviceAugment",
    "DeviceViews",
    "build_loader",
    "build_linear_loaders",
    "set_loader_epoch",
    "skipped_samples",
]
