"""MoBY: MoCo v2's queue and momentum target with BYOL's asymmetric predictor (Xie et al., 2021)."""

import torch
import torch.nn.functional as F

from distributed import all_gather_cat

from .base import MomentumFramework


def info_nce_logits(q, k, queue):
    """Cosine logits of each query against its key (column 0) and the queue.

    q, k: [B, D] unit vectors; queue: [D, K] unit keys.
    Returns logits [B, 1 + K] (not divided by the temperature) and sim = q @ queue [B, K].
    """
    positive = (q * k).sum(dim=1, keepdim=True)  # [B, 1]
    sim = q @ queue  # [B, K]
    return torch.cat([positive, sim], dim=1), sim


class MoBY(MomentumFramework):
    """Symmetric InfoNCE between the online prediction of one view and the target
    projection of the other, against a queue of past target projections of that view.

    Buffers: ``queue1`` / ``queue2`` [proj_dim, num_negative] hold the keys of view 1 /
    view 2 of the global batch (all ranks, in rank order), ``queue_ptr`` the next slot.

    Args:
        temperature: InfoNCE temperature.
        num_negative: queue length; must be a multiple of the global batch.
        **kwargs: see ``MomentumFramework``.
    """

    def __init__(self, encoder, encoder_k, temperature=0.2, num_negative=4096, **kwargs):
        super().__init__(encoder, encoder_k, **kwargs)
        self.temperature = temperature
        self.num_negative = num_negative
        self.register_buffer("queue1", F.normalize(torch.randn(self.proj_dim, num_negative), dim=0))
        self.register_buffer("queue2", F.normalize(torch.randn(self.proj_dim, num_negative), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys1, keys2):
        """Replace the oldest entries by the keys of the global batch. keys: [B, D] per rank."""
        keys1, keys2 = all_gather_cat(keys1), all_gather_cat(keys2)  # [B * world, D]
        n = keys1.shape[0]
        if self.num_negative % n:
            raise ValueError(
                f"queue length {self.num_negative} is not a multiple of the global batch {n}: "
                "change MODEL.CONTRAST_NUM_NEGATIVE or the batch size"
            )
        # slots ptr .. ptr + n - 1, addressed on the device: no host-device synchronisation
        slots = self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)
        self.queue1.index_copy_(1, slots, keys1.T.to(self.queue1.dtype))
        self.queue2.index_copy_(1, slots, keys2.T.to(self.queue2.dtype))
        self.queue_ptr.add_(n).remainder_(self.num_negative)

    def contrast(self, q, k, queue):
        """Logits [B, 1 + negatives] of queries q [B, D] against key k and queue [D, K].

        ``queue`` is a snapshot: the buffer itself is overwritten by ``enqueue``
        before the backward pass needs it.
        """
        logits, _ = info_nce_logits(q, k, queue.clone())
        return logits

    def loss(self, online, target):
        pred1, pred2 = (F.normalize(p, dim=1) for p in online)
        key1, key2 = (F.normalize(k, dim=1) for k in target)
        # view 1's prediction against view 2's key and the queue of view-2 keys, and vice versa
        logits = torch.cat([self.contrast(pred1, key2, self.queue2), self.contrast(pred2, key1, self.queue1)])
        logits = logits / self.temperature  # [2B, 1 + negatives]
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        # sum of the two directions, each averaged over its batch, as in MoBY
        loss = 2 * F.cross_entropy(logits, labels)
        if self.training:
            self.enqueue(key1, key2)
        return {"loss": loss, "logits": logits.detach(), "labels": labels}
