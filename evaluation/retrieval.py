"""Image retrieval on revisited Oxford / Paris: features, rankings and the benchmark's mAP.

    ranking = rank_database(query_feats, database_feats)            # [Q, N], best first
    mean_ap, aps = revisited_map(ranking, protocol_ground_truth(gnd, "medium"))

The revisited protocol (Radenović et al., CVPR 2018) scores each query in two settings:

* Medium: the ``easy`` and ``hard`` images are positives; ``junk`` ones are ignored;
* Hard: only the ``hard`` images are positives; ``easy`` and ``junk`` ones are ignored.

An ignored image is taken out of the ranking before the positives' ranks are counted; a query
without positives in a setting is left out of that setting's mean.
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.retrieval import retrieval_loader
from distributed import get_rank, get_world_size
from engine import extract_features

SETTINGS = {  # setting -> (positive kinds, ignored kinds)
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("easy", "junk")),
}
SCALES = (1.0, 1 / math.sqrt(2), 0.5)  # multi-scale features, as DINO's retrieval evaluation


def average_precision(positive_ranks, num_positives):
    """Average precision of one query, as the revisited benchmark computes it.

    positive_ranks: increasing 0-based ranks of the positives in the ranking once the ignored
    images are taken out of it; num_positives: the query's positives (any not ranked are missed).
    Each positive adds a recall step of 1 / num_positives, over which precision is taken as the
    mean of its values just before and at the positive (the trapezoid rule): at the j-th positive
    (0-based) at rank r, j / r before it (1 at r = 0) and (j + 1) / (r + 1) at it.
    """
    area = 0.0
    for j, r in enumerate(positive_ranks):
        before = 1.0 if r == 0 else j / r
        at = (j + 1) / (r + 1)
        area += (before + at) / 2
    return area / num_positives


def protocol_ground_truth(gnd, setting):
    """Per query, (positives, ignored) database indices of ``setting`` ("medium" or "hard")."""
    positive_kinds, ignored_kinds = SETTINGS[setting]

    def indices(entry, kinds):
        return np.concatenate([np.asarray(entry[k], dtype=np.int64).reshape(-1) for k in kinds])

    return [(indices(entry, positive_kinds), indices(entry, ignored_kinds)) for entry in gnd]


def revisited_map(ranking, ground_truth):
    """(mean AP over the queries that have positives, each query's AP: nan for those without).

    ranking: [Q, N] database indices, best first, per query; ground_truth: per query
    (positives, ignored) index arrays (``protocol_ground_truth``).
    """
    ranking = np.asarray(ranking)
    aps = []
    for order, (positives, ignored) in zip(ranking, ground_truth, strict=True):
        if len(positives) == 0:
            aps.append(math.nan)
            continue
        rank_of = np.empty(len(order), dtype=np.int64)
        rank_of[order] = np.arange(len(order))
        positive_ranks = np.sort(rank_of[positives])
        ignored_ranks = np.sort(rank_of[ignored])
        # each positive moves up by the ignored images ranked before it
        positive_ranks = positive_ranks - np.searchsorted(ignored_ranks, positive_ranks)
        aps.append(average_precision(positive_ranks.tolist(), len(positives)))
    scored = [ap for ap in aps if not math.isnan(ap)]
    return (sum(scored) / len(scored) if scored else math.nan), aps


def rank_database(query_feats, database_feats):
    """[Q, N] database indices by decreasing cosine similarity to each query (ties: lower index first).
    Features: [Q, D] and [N, D], L2-normalised."""
    similarity = query_feats.float() @ database_feats.float().T
    return torch.argsort(-similarity, dim=1, stable=True).cpu().numpy()


class MultiScale(nn.Module):
    """Features of ``encoder`` averaged over the batch resized to each of ``scales`` (bilinear),
    each scale at the nearest size the encoder takes (``encoder.input_size``); the caller
    L2-normalises the mean, as DINO's multi-scale retrieval features are made."""

    def __init__(self, encoder, scales=SCALES):
        super().__init__()
        self.encoder, self.scales = encoder, scales

    def input_size(self, height, width):
        return self.encoder.input_size(height, width)

    def forward(self, images):  # [B, 3, H, W] -> [B, D]
        height, width = images.shape[-2:]
        total = 0.0
        for scale in self.scales:
            size = tuple(self.encoder.input_size(round(height * scale), round(width * scale)))
            scaled = images if size == (height, width) else F.interpolate(images, size=size, mode="bilinear")
            total = total + self.encoder(scaled).float()
        return total / len(self.scales)


def retrieval_features(encoder, dataset, batch_size, num_workers, device, autocast):
    """L2-normalised features [len(dataset), D] of every image of ``dataset`` (a ``RetrievalImages``),
    on every rank: each process extracts its share, in batches of one input size."""
    rank, world_size = get_rank(), get_world_size()
    pin_memory = device.type == "cuda"
    loader, order = retrieval_loader(dataset, rank, world_size, batch_size, num_workers, pin_memory)
    feats, _ = extract_features(encoder, loader, len(dataset), rank, device, autocast, order=order)
    return feats
