"""SynCo: MoBY with synthetic hard negatives made from the queue (Giakoumoglou et al., 2025)."""

import torch

from .moby import MoBY, info_nce_logits
from .synthetic_negatives import SyntheticNegativeConfig, draw_choices, synthetic_logits


class SynCo(MoBY):
    """MoBY whose queue logits are extended, for each query, with synthetic negatives
    made from its ``n_hard`` most similar queue entries (see ``synthetic_negatives``),
    from epoch ``hard_negative_epochs[0]`` to ``hard_negative_epochs[1]``, both included.
    ``loss`` returns MoBY's dict and ``real_columns``: the logits before the synthetic ones.

    Args:
        synthetic: SyntheticNegativeConfig (counts N1..N6 and the constants of the six kinds).
        hard_negative_epochs: (first, last) epoch with synthetic negatives.
        **kwargs: see ``MoBY``.
    """

    def __init__(self, encoder, encoder_k, synthetic=None, hard_negative_epochs=(30, 100), **kwargs):
        super().__init__(encoder, encoder_k, **kwargs)
        self.synthetic = synthetic or SyntheticNegativeConfig()
        self.hard_negative_epochs = hard_negative_epochs

    @property
    def hard_negatives_active(self):
        first, last = self.hard_negative_epochs
        return first <= self.epoch <= last

    def contrast(self, q, k, queue):
        if not self.hard_negatives_active:
            return super().contrast(q, k, queue)
        rows = queue.t().contiguous()  # [K, D] snapshot of the queue, rows gather fast
        logits, sim = info_nce_logits(q, k, rows.t())  # [B, 1 + K], [B, K]
        choices = draw_choices(sim, q.shape[1], self.synthetic)
        synthetic = synthetic_logits(q, rows, sim, choices, self.synthetic)  # [B, N1 + ... + N6]
        return torch.cat([logits, synthetic], dim=1)

    def loss(self, online, target):
        out = super().loss(online, target)
        # the logits' columns [0, real_columns) are the positive and the queue, the rest synthetic
        out["real_columns"] = 1 + self.num_negative
        return out
