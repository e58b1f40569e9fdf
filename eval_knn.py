"""Weighted k-NN classification on frozen features of a pretrained encoder (DINO's protocol).

    torchrun --nproc_per_node=4 eval_knn.py --cfg configs/synco_vit_small.yaml \
        --data-path /path/to/imagenet --output output --tag run1 [--opts DATA.DATASET cifar10]

Features: the online encoder's output, L2-normalised, of center-cropped images (train and val
alike). Each val image votes with its k nearest training features, each weighted by
exp(cosine / T); top-1 / top-5 for each k of KNN.NB_KNN (--nb-knn, default 10 20 100 200),
T = KNN.TEMPERATURE (--temperature, default 0.07). --dump-features saves the features, and
--load-features scores saved ones without the encoder or the images.
"""

from cli import build_parser, in_range

EXAMPLE = (
    "torchrun --nproc_per_node=4 eval_knn.py --cfg configs/synco_vit_small.yaml "
    "--data-path /path/to/imagenet --output output --tag run1"
)
FEATURE_KEYS = ("train_feats", "train_labels", "val_feats", "val_labels")


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
from data.linear import canonical_dataset_name
from distributed import get_world_size, join_processes
from engine import extract_features
from metrics import count_correct
from models import build_encoder
from precision import amp_autocast
from pretrained import inherit_encoder_settings, load_run_encoder


@torch.no_grad()
def knn_correct(train_feats, train_labels, test_feats, test_labels, k, num_classes, temperature, chunk=256):
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


def compute_features(config, env, logger, held):
    """{train_feats [N, D], train_labels [N], val_feats [M, D], val_labels [M]} and the number of
    classes, on every rank, from the run's encoder."""
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
    return dict(zip(FEATURE_KEYS, (train_feats, train_labels, val_feats, val_labels))), num_classes


def load_features(path, device):
    """The features ``--dump-features`` saved in ``path``, and their number of classes."""
    if not os.path.isfile(path):
        raise ConfigError(f"no features file at {path} (--load-features): write one with --dump-features")
    saved = read_checkpoint(path)
    if not isinstance(saved, dict) or not set(FEATURE_KEYS) <= set(saved):
        raise ConfigError(f"{path} is not a features file of eval_knn.py --dump-features")
    return {key: saved[key].to(device) for key in FEATURE_KEYS}, saved["num_classes"]


def main(config, env, logger, held=None):
    device, knn = env.device, config.KNN
    if knn.LOAD_FEATURES:
        features, num_classes = load_features(knn.LOAD_FEATURES, device)
        logger.info(f"read the features of {knn.LOAD_FEATURES}")
    else:
        features, num_classes = compute_features(config, env, logger, held)
        if knn.DUMP_FEATURES and env.is_main:
            save_atomic({**{k: v.cpu() for k, v in features.items()}, "num_classes": num_classes}, knn.DUMP_FEATURES)
            logger.info(f"saved the features to {knn.DUMP_FEATURES}")
    num_val = len(features["val_labels"])
    # every rank holds every feature; each scores its own share of the val set
    mine = torch.arange(env.rank, num_val, env.world_size, device=device)
    results = {}
    for k in knn.NB_KNN:
        c1, c5 = knn_correct(features["train_feats"], features["train_labels"], features["val_feats"][mine],
                             features["val_labels"][mine], k, num_classes, knn.TEMPERATURE)  # fmt: skip
        counts = torch.tensor([c1, c5], dtype=torch.float64, device=device)
        if get_world_size() > 1:
            torch.distributed.all_reduce(counts)
        results[k] = (100 * counts / num_val).tolist()
        logger.info(f"{k}-NN (T={knn.TEMPERATURE}): top-1 {results[k][0]:.2f}% top-5 {results[k][1]:.2f}%")
    return results


def setup(argv=None):
    args = parse_option(argv)
    config = get_config(args)
    check_config(config)
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
