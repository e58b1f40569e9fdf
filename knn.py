"""Weighted k-NN classification of frozen features (DINO's protocol), over a training bank that
may be sharded over the processes: what eval_knn.py scores and the k-NN monitor of pretraining
(``monitor.py``) reports.

Each test feature votes with its k nearest training features (cosine), each weighted by
exp(cosine / T), for its label.
"""

import torch
import torch.nn.functional as F

from distributed import all_gather_cat
from metrics import count_correct


@torch.no_grad()
def knn_candidates(train_feats, train_labels, test_feats, k):
    """The ``k`` training features most similar to each test feature among ``train_feats`` (the
    whole bank, or one rank's shard of it): (cosine [b, k], decreasing, and their labels [b, k]).
    A shard of fewer than ``k`` is padded with cosine -inf, whose vote weighs nothing.

    train_feats: [n, D] and test_feats: [b, D] unit vectors; train_labels: [n].
    """
    sim = test_feats @ train_feats.T  # [b, n]
    weight, index = sim.topk(min(k, sim.shape[1]), dim=1)
    pad = k - weight.shape[1]
    return F.pad(weight, (0, pad), value=float("-inf")), F.pad(train_labels[index], (0, pad))


@torch.no_grad()
def knn_votes(sims, labels, test_labels, ks, num_classes, temperature):
    """{k: (top-1 correct, top-5 correct)} of the weighted votes of the global k nearest neighbours,
    from the candidates of S shards: ``sims``, ``labels`` [S, b, K] (``knn_candidates`` of each
    shard, K >= max(ks)); each neighbour votes for its label with weight exp(cosine / T)."""
    sims, labels = sims.permute(1, 0, 2).flatten(1), labels.permute(1, 0, 2).flatten(1)  # [b, S * K]
    weight, pick = sims.topk(max(ks), dim=1)  # decreasing: the first k are the k nearest
    labels, weight = labels.gather(1, pick), (weight / temperature).exp()
    counts = {}
    for k in ks:
        votes = weight.new_zeros(weight.shape[0], num_classes)
        votes.scatter_add_(1, labels[:, :k], weight[:, :k])  # [b, C]
        counts[k] = tuple(count_correct(votes, test_labels))
    return counts


@torch.no_grad()
def knn_scores(train_feats, train_labels, test_feats, test_labels, ks, num_classes, temperature, chunk=256,
               gather=all_gather_cat):  # fmt: skip
    """{k: (top-1 correct, top-5 correct)} of weighted k-NN votes over every test feature, for each k of ``ks``.

    ``train_feats`` [n, D], ``train_labels`` [n]: this rank's shard of the training bank (the whole
    bank in one process); ``test_feats`` [M, D], ``test_labels`` [M]: the same on every rank. For each
    chunk of test features every rank takes the max(ks) nearest of its shard, ``gather`` exchanges
    them ([world, b, K]: one all_gather of the similarities and one of the labels) and every rank
    votes with the global nearest, so that all return the counts of the unsharded bank.
    """
    totals = dict.fromkeys(ks, (0, 0))
    for start in range(0, test_feats.shape[0], chunk):
        sims, labels = knn_candidates(train_feats, train_labels, test_feats[start : start + chunk], max(ks))
        counts = knn_votes(gather(sims[None]), gather(labels[None]), test_labels[start : start + chunk], ks,
                           num_classes, temperature)  # fmt: skip
        totals = {k: (totals[k][0] + counts[k][0], totals[k][1] + counts[k][1]) for k in ks}
    return totals


def knn_correct(train_feats, train_labels, test_feats, test_labels, k, num_classes, temperature, chunk=256):
    """(top-1 correct, top-5 correct) of weighted k-NN votes in one process.

    train_feats: [N, D] and test_feats: [M, D] unit vectors; labels: [N], [M].
    """
    return knn_scores(train_feats, train_labels, test_feats, test_labels, [k], num_classes, temperature, chunk,
                      gather=lambda x: x)[k]  # fmt: skip
