"""Weighted k-NN classification on frozen features of a pretrained encoder (DINO's protocol).

    torchrun --nproc_per_node=4 eval_knn.py --cfg configs/synco_vit_small.yaml \
        --data-path /path/to/imagenet --output output --tag run1 [--opts DATA.DATASET cifar10]

Features: the online encoder's output, L2-normalised, of center-cropped images
(train and val alike). Each val image votes with its k nearest training
features, each weighted by exp(cosine / T), T = 0.07; top-1 / top-5 for k in
10, 20, 100, 200.
"""

import os

import torch

from cli import build_parser, open_output, run_cli
from config import ConfigError, check_config, get_config
from data import build_linear_loaders
from data.linear import canonical_dataset_name
from distributed import get_world_size, join_processes
from engine import extract_features
from metrics import count_correct
from models import build_encoder
from precision import amp_autocast
from pretrained import inherit_encoder_settings, load_run_encoder

EXAMPLE = (
    "torchrun --nproc_per_node=4 eval_knn.py --cfg configs/synco_vit_small.yaml "
    "--data-path /path/to/imagenet --output output --tag run1"
)
KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


@torch.no_grad()
def knn_correct(train_feats, train_labels, test_feats, test_labels, k, num_classes, temperature=TEMPERATURE,
                chunk=256):  # fmt: skip
    """(top-1 correct, top-5 correct) of weighted k-NN votes.

    train_feats: [N, D] and test_feats: [M, D] unit vectors; labels: [N], [M].
    """
    k = min(k, train_feats.shape[0])
    correct1 = correct5 = 0
    for start in range(0, test_feats.shape[0], chunk):
        sim = test_feats[start : start + chunk] @ train_feats.T  # [b, N]
        weight, index = sim.topk(k, dim=1)  # [b, k]
        votes = sim.new_zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[index], (weight / temperature).exp())  # [b, C]
        c1, c5 = count_correct(votes, test_labels[start : start + chunk])
        correct1, correct5 = correct1 + c1, correct5 + c5
    return correct1, correct5


def main(config, env, logger, held=None):
    device = env.device
    autocast = amp_autocast(config, device)
    try:
        train_set, val_set, train_loader, val_loader, num_classes = build_linear_loaders(config, for_features=True)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = build_encoder(config, drop_path_rate=0.0)
    load_run_encoder(model, config, logger, held)
    model.to(device)

    train_feats, train_labels = extract_features(model, train_loader, len(train_set), env.rank, device, autocast)
    val_feats, val_labels = extract_features(model, val_loader, len(val_set), env.rank, device, autocast)
    logger.info(f"{config.DATA.DATASET}: features of {len(train_set)} train and {len(val_set)} val images")
    # every rank holds every feature; each scores its own share of the val set
    mine = torch.arange(env.rank, len(val_set), env.world_size, device=device)
    results = {}
    for k in KS:
        c1, c5 = knn_correct(train_feats, train_labels, val_feats[mine], val_labels[mine], k, num_classes)
        counts = torch.tensor([c1, c5], dtype=torch.float64, device=device)
        if get_world_size() > 1:
            torch.distributed.all_reduce(counts)
        results[k] = (100 * counts / len(val_set)).tolist()
        logger.info(f"{k}-NN (T={TEMPERATURE}): top-1 {results[k][0]:.2f}% top-5 {results[k][1]:.2f}%")
    return results


def parse_option(argv=None):
    parser = build_parser(
        "eval_knn.py", "Weighted k-NN classification on the frozen features of a pretrained encoder.", EXAMPLE,
        training=False, throughput=False,
    )  # fmt: skip
    return parser.parse_args(argv)


def setup(argv=None):
    args = parse_option(argv)
    config = get_config(args)
    check_config(config)
    env = join_processes(config, args.local_rank)
    held, inherited = inherit_encoder_settings(config, args, env)
    try:
        output_dir = os.path.join(config.OUTPUT, f"knn_{canonical_dataset_name(config.DATA.DATASET)}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    logger = open_output(config, env, output_dir, f"{config.MODEL.NAME}_knn", inherited)
    return config, env, logger, held


if __name__ == "__main__":
    run_cli(setup, main)
