"""BYOL: predict the target projection of the other view (Grill et al., 2020)."""

import torch.nn.functional as F

from .base import MomentumFramework


def regression_loss(pred, target):
    """Normalised MSE ``2 - 2 cos(pred, target)`` per sample. [B, D], [B, D] -> [B]."""
    return 2 - 2 * (F.normalize(pred, dim=1) * F.normalize(target, dim=1)).sum(dim=1)


class BYOL(MomentumFramework):
    """Symmetric BYOL loss, the mean of its two directions (as the original code); no negatives."""

    def loss(self, online, target):
        (pred1, pred2), (proj1_k, proj2_k) = online, target
        loss = 0.5 * (regression_loss(pred1, proj2_k).mean() + regression_loss(pred2, proj1_k).mean())
        return {"loss": loss}
