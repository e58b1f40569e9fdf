"""Weighted k-NN classification on frozen features of a pretrained encoder (DINO's protocol).

    torchrun --nproc_per_node=4 eval_knn.py --cfg configs/synco_vit_small.yaml \
        --data-path /path/to/imagenet --output output --tag run1 [--opts DATA.DATASET cifar10]

Features: the online encoder's output, L2-normalised, of center-cropped images (train and val
alike). Each val image votes with its k nearest training features, each weighted by
exp(cosine / T); top-1 / top-5 for each k of KNN.NB_KNN (--nb-knn, default 10 20 100 200),
T = KNN.TEMPERATURE (--temperature, default 0.07). --dump-features saves the features, and
--load-features scores saved ones without the encoder or the images.

With several processes the training bank is sharded: each rank keeps the features of its own
share of the training set (N / world x D), finds each val feature's nearest neighbours among them,
and the ranks exchange those candidates to vote with the global nearest (the figures of one process).
"""

from cli import build_parser, in_range

EXAMPLE = (
    "torchrun --nproc_per_node=4 eval_knn.py --cfg configs/synco_vit_small.yaml "
    "--data-path /path/to/imagenet --output output --tag run1"
)
FEATURE_KEYS = ("train_feats", "train_labels", "val_feats", "val_labels")
# what a rank holds: its share of the training bank, with the dataset index of each row, and all val features
SHARD_KEYS = ("train_feats", "train_labels", "train_index", "val_feats", "val_labels")


def parse_option(argv=None):
    parser = build_parser(
        "eval_knn.py", "Weighted k-NN classification on the frozen features of a pretrained encoder.", EXAMPLE,
        training=False, throughput=False,
    )  # fmt: skip
    parser.add_argument(
        "--nb-knn", "--nb_knn", dest="nb_knn", type=in_range("KNN.NB_KNN", int), nargs="+", metavar="K",
        help="numbers of nearest neighbours scored (KNN.NB_KNN; default 10 20 100 200)",
    )  # fmt: skip
    parser.add_argument(
        "--temperature",
        type=in_range("KNN.TEMPERATURE", float),
        metavar="T",
        help="temperature of the weighted votes (KNN.TEMPERATURE; default 0.07)",
    )
    parser.add_argument(
        "--dump-features", "--dump_features", dest="knn_dump_features", metavar="PATH",
        help="save the features to PATH (KNN.DUMP_FEATURES)",
    )  # fmt: skip
    parser.add_argument(
        "--load-features", "--load_features", dest="knn_load_features", metavar="PATH",
        help="score the features saved in PATH; no encoder or images needed (KNN.LOAD_FEATURES)",
    )  # fmt: skip
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_option()  # --help and a wrong flag answer before torch loads

import os

import torch

from checkpoint import read_checkpoint, save_atomic
from cli import open_output, run_cli
from config import ConfigError, check_config, get_config
from data import build_linear_loaders
from data.linear import canonical_dataset_name, check_imagenet_files
from distributed import gather_rows_to_main, join_processes
from engine import extract_features
from knn import knn_scores
from models import build_encoder
from precision import amp_autocast
from pretrained import inherit_encoder_settings, load_run_encoder


def bank_line(features, num_train):
    """What this rank's share of the training bank holds, as one line."""
    held = sum(features[key].numel() * features[key].element_size() for key in ("train_feats", "train_labels"))
    return (f"k-NN bank: {features['train_feats'].shape[0]} of the {num_train} training features on this rank "
            f"({held / 2**20:.1f} MiB on {features['train_feats'].device})")  # fmt: skip


def compute_features(config, env, logger, held):
    """({train_feats [n, D], train_labels [n], train_index [n]: this rank's share of the training
    set; val_feats [M, D], val_labels [M]: the whole val set}, number of classes, number of training
    images), from the run's encoder."""
    device = env.device
    autocast = amp_autocast(config, device)
    try:
        train_set, val_set, train_loader, val_loader, num_classes = build_linear_loaders(config, for_features=True)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = build_encoder(config, drop_path_rate=0.0)
    load_run_encoder(model, config, logger, held)
    model.to(device)
    train = extract_features(model, train_loader, len(train_set), env.rank, device, autocast, gather=False)
    val = extract_features(model, val_loader, len(val_set), env.rank, device, autocast)
    logger.info(f"{config.DATA.DATASET}: features of {len(train_set)} train and {len(val_set)} val images")
    return dict(zip(SHARD_KEYS, (*train, *val))), num_classes, len(train_set)


def dump_features(path, features, num_classes, num_train, env):
    """Save the whole training bank (gathered in host memory on rank 0) and the val features to
    ``path``, in the one-file format ``load_features`` reads with any number of processes."""
    train = [gather_rows_to_main(features[key], features["train_index"], num_train) for key in FEATURE_KEYS[:2]]
    if env.is_main:
        saved = dict(zip(FEATURE_KEYS, (*train, features["val_feats"].cpu(), features["val_labels"].cpu())))
        save_atomic({**saved, "num_classes": num_classes}, path)


def load_features(path, device, rank=0, world_size=1):
    """What ``compute_features`` returns, from the features ``--dump-features`` saved in ``path``:
    this rank's share of the training bank (``rank, rank + world_size, ...``) and all val features."""
    if not os.path.isfile(path):
        raise ConfigError(f"no features file at {path} (--load-features): write one with --dump-features")
    saved = read_checkpoint(path)
    if not isinstance(saved, dict) or not set(FEATURE_KEYS) <= set(saved):
        raise ConfigError(f"{path} is not a features file of eval_knn.py --dump-features")
    num_train = saved["train_labels"].shape[0]
    index = torch.arange(rank, num_train, world_size)
    train = [saved[key][index].to(device) for key in FEATURE_KEYS[:2]]  # a copy of the share alone
    val = [saved[key].to(device) for key in FEATURE_KEYS[2:]]
    return dict(zip(SHARD_KEYS, (*train, index.to(device), *val))), saved["num_classes"], num_train


def main(config, env, logger, held=None):
    device, knn = env.device, config.KNN
    if knn.LOAD_FEATURES:
        features, num_classes, num_train = load_features(knn.LOAD_FEATURES, device, env.rank, env.world_size)
        logger.info(f"read the features of {knn.LOAD_FEATURES}")
    else:
        features, num_classes, num_train = compute_features(config, env, logger, held)
        if knn.DUMP_FEATURES:
            dump_features(knn.DUMP_FEATURES, features, num_classes, num_train, env)
            logger.info(f"saved the features to {knn.DUMP_FEATURES}")
    logger.info(bank_line(features, num_train))
    counts = knn_scores(features["train_feats"], features["train_labels"], features["val_feats"],
                        features["val_labels"], list(knn.NB_KNN), num_classes, knn.TEMPERATURE)  # fmt: skip
    num_val = len(features["val_labels"])
    results = {}
    for k in knn.NB_KNN:
        results[k] = [100 * c / num_val for c in counts[k]]
        logger.info(f"{k}-NN (T={knn.TEMPERATURE}): top-1 {results[k][0]:.2f}% top-5 {results[k][1]:.2f}%")
    return results


def setup(argv=None):
    args = parse_option(argv)
    config = get_config(args)
    check_config(config)
    if not config.KNN.LOAD_FEATURES:
        check_imagenet_files(config)  # before the checkpoint and any folder: missing data leaves nothing behind
    env = join_processes(config, args.local_rank)
    # saved features need no encoder, nor its checkpoint
    held, inherited = (None, []) if config.KNN.LOAD_FEATURES else inherit_encoder_settings(config, args, env)
    try:
        output_dir = os.path.join(config.OUTPUT, f"knn_{canonical_dataset_name(config.DATA.DATASET)}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    logger = open_output(config, env, output_dir, f"{config.MODEL.NAME}_knn", inherited)
    return config, env, logger, held


if __name__ == "__main__":
    run_cli(setup, main)
