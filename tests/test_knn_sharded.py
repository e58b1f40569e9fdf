"""k-NN with the training bank sharded over the ranks: the counts of the whole bank in one process,
each rank holding only its share, and --dump-features / --load-features across process counts."""

import math
import os
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_distributed import free_port

from distributed import DistEnv, gather_rows_to_main
from engine import extract_features
from eval_knn import dump_features, load_features
from knn import knn_candidates, knn_correct, knn_scores, knn_votes
from metrics import count_correct

NUM_TRAIN, NUM_VAL, DIM, CLASSES, T = 101, 37, 16, 12, 0.07
KS = [1, 5, 20, 200]  # 200: more than the bank, and than either shard


def bank(seed=0):
    """(train features [101, 16], labels, val features [37, 16], labels): unit vectors around 12 class centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, DIM, generator=g)

    def draw(n):
        labels = torch.randint(0, CLASSES, (n,), generator=g)
        return F.normalize(centres[labels] + 2.0 * torch.randn(n, DIM, generator=g), dim=1), labels

    return (*draw(NUM_TRAIN), *draw(NUM_VAL))


def reference_knn(train, train_labels, test, test_labels, k):
    """The weighted votes as one similarity matrix over the whole bank: DINO's formulation."""
    sim = test @ train.T
    weight, index = sim.topk(min(k, train.shape[0]), dim=1)
    votes = sim.new_zeros(test.shape[0], CLASSES).scatter_add_(1, train_labels[index], (weight / T).exp())
    return tuple(count_correct(votes, test_labels))


def expected_counts():
    train, train_labels, val, val_labels = bank()
    return {k: knn_correct(train, train_labels, val, val_labels, k, CLASSES, T, chunk=8) for k in KS}


def test_unsharded_counts_are_the_reference():
    train, train_labels, val, val_labels = bank()
    for k, counts in expected_counts().items():
        assert counts == reference_knn(train, train_labels, val, val_labels, k)
    assert len(set(expected_counts().values())) > 1  # the k matter on this bank


def test_two_shards_merged_equal_the_whole_bank():
    """A fake world of 2 in one process: each half's candidates, merged, vote as the whole bank."""
    train, train_labels, val, val_labels = bank()
    shards = [knn_candidates(train[r::2], train_labels[r::2], val, max(KS)) for r in range(2)]
    sims, labels = torch.stack([s for s, _ in shards]), torch.stack([lab for _, lab in shards])
    assert sims.shape == labels.shape == (2, NUM_VAL, max(KS))
    assert knn_votes(sims, labels, val_labels, KS, CLASSES, T) == expected_counts()


def _identity_features(rows, labels, num_samples, rank, gather):
    """extract_features of an identity encoder over this rank's rows (``rank, rank + 2, ...``), in batches of 7."""
    mine = slice(rank, None, 2)
    loader = [(rows[mine][i : i + 7], labels[mine][i : i + 7]) for i in range(0, len(labels[mine]), 7)]
    return extract_features(torch.nn.Identity(), loader, num_samples, rank, torch.device("cpu"), nullcontext,
                            gather=gather)  # fmt: skip


def _sharded_worker(rank, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    train, train_labels, val, val_labels = bank()
    feats, labels, index = _identity_features(train, train_labels, NUM_TRAIN, rank, gather=False)
    val_feats, val_labels_all = _identity_features(val, val_labels, NUM_VAL, rank, gather=True)
    features = dict(train_feats=feats, train_labels=labels, train_index=index, val_feats=val_feats,
                    val_labels=val_labels_all)  # fmt: skip
    result = {
        "index": index,
        "bank_bytes": [t.numel() * t.element_size() for t in (feats, labels)],
        "counts": knn_scores(feats, labels, val_feats, val_labels_all, KS, CLASSES, T, chunk=8),
        # blocks of 4 rows of 16 floats: 13 blocks, the last of rank 1 padded
        "gathered": gather_rows_to_main(feats, index, NUM_TRAIN, block_bytes=4 * DIM * 4),
    }
    path = os.path.join(folder, "features.pth")
    dump_features(path, features, CLASSES, NUM_TRAIN, DistEnv(rank, 2))
    dist.barrier()  # rank 0 has written it
    loaded, num_classes, num_train = load_features(path, torch.device("cpu"), rank, 2)
    result["loaded_counts"] = knn_scores(loaded["train_feats"], loaded["train_labels"], loaded["val_feats"],
                                         loaded["val_labels"], KS, num_classes, T, chunk=8)  # fmt: skip
    result["loaded_bytes"] = [loaded[key].untyped_storage().nbytes() for key in ("train_feats", "train_labels")]
    result["loaded_index"], result["num_train"] = loaded["train_index"], num_train
    torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_count_as_one(tmp_path):
    """(b) two gloo processes give the counts of one; (c) each keeps N / 2 x D of the bank;
    --dump-features writes the whole bank, which one process or two read back to the same counts."""
    mp.spawn(_sharded_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = expected_counts()
    train, train_labels, val, val_labels = bank()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank, result in enumerate(results):
        share = len(range(rank, NUM_TRAIN, 2))  # 51 and 50
        assert result["counts"] == result["loaded_counts"] == expected
        assert torch.equal(result["index"], torch.arange(rank, NUM_TRAIN, 2))
        assert torch.equal(result["loaded_index"], result["index"]) and result["num_train"] == NUM_TRAIN
        # (c) the rank's bank: its share of the rows, in fp32, and int64 labels
        assert result["bank_bytes"] == result["loaded_bytes"] == [share * DIM * 4, share * 8]
        assert share == math.ceil(NUM_TRAIN / 2) - rank
    torch.testing.assert_close(results[0]["gathered"], train)  # the rows back in dataset order, on rank 0
    assert results[1]["gathered"] is None
    saved = torch.load(tmp_path / "features.pth", weights_only=True)
    torch.testing.assert_close(saved["train_feats"], train)
    torch.testing.assert_close(saved["val_feats"], val)
    assert torch.equal(saved["train_labels"], train_labels) and torch.equal(saved["val_labels"], val_labels)
    # the dump read back in one process
    loaded, num_classes, _ = load_features(str(tmp_path / "features.pth"), torch.device("cpu"))
    assert loaded["train_feats"].shape == (NUM_TRAIN, DIM) and num_classes == CLASSES
    one = knn_scores(loaded["train_feats"], loaded["train_labels"], loaded["val_feats"], loaded["val_labels"], KS,
                     CLASSES, T, gather=lambda x: x)  # fmt: skip
    assert one == expected
