"""BYOL: predict the target projection of the other view (Grill et al., 2020)."""

import torch
import torch.nn.functional as F

from .base import MomentumFramework


def regression_loss(pred, target):
    """Normalised MSE ``2 - 2 cos(pred, target)`` per sample. [B, D], [B, D] -> [B]."""
    return 2 - 2 * (F.normalize(pred, dim=1) * F.normalize(target, dim=1)).sum(dim=1)


@torch.no_grad()
def batch_top1(pred1, key2, pred2, key1):
    """In %, how often a prediction's most similar target key in the batch is its own image's
    (BYOL has no negatives, so no contrastive accuracy; this one rises as the embedding learns
    and stays at chance, 100 / B, when it collapses). [B, D] each -> scalar tensor."""
    hits = []
    for pred, key in ((pred1, key2), (pred2, key1)):
        sim = F.normalize(pred, dim=1) @ F.normalize(key, dim=1).T  # [B, B], positives on the diagonal
        hits.append(sim.argmax(dim=1) == torch.arange(sim.shape[0], device=sim.device))
    return torch.cat(hits).float().mean() * 100


class BYOL(MomentumFramework):
    """Symmetric BYOL loss, the mean of its two directions (as the original code); no negatives."""

    def loss(self, online, target):
        (pred1, pred2), (proj1_k, proj2_k) = online, target
        loss = 0.5 * (regression_loss(pred1, proj2_k).mean() + regression_loss(pred2, proj1_k).mean())
        return {"loss": loss, "batch_acc1": batch_top1(pred1, proj2_k, pred2, proj1_k)}
