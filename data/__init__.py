"""Self-supervised pretraining data: two-view augmented ImageNet from a folder or a zip."""

from data.build import build_loader, set_loader_epoch

__all__ = ["build_loader", "set_loader_epoch"]
