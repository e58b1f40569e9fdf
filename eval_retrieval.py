"""Image retrieval on revisited Oxford 5k / Paris 6k with the frozen features of a pretrained encoder.

    torchrun --nproc_per_node=4 eval_retrieval.py --cfg configs/synco_vit_small.yaml \
        --output output --tag run1 --opts DATA.DATASET roxford5k DATA.TRANSFER_ROOT /path/to/revisitop

Queries are cropped to their box, database images fed whole, each shrunk so its longest side is
at most RETRIEVAL.IMG_SIZE (aspect kept); features are the online encoder's output, L2-normalised
(optionally averaged over scales 1, 1/sqrt(2), 1/2 first: RETRIEVAL.MULTISCALE). The database is
ranked by cosine similarity to each query, and the revisited protocol's mAP is reported for its
Medium and Hard settings (evaluation/retrieval.py).
"""

from cli import build_parser

EXAMPLE = (
    "torchrun --nproc_per_node=4 eval_retrieval.py --cfg configs/synco_vit_small.yaml --output output --tag run1 "
    "--opts DATA.DATASET roxford5k DATA.TRANSFER_ROOT /path/to/revisitop"
)


def parse_option(argv=None):
    parser = build_parser(
        "eval_retrieval.py", "Image retrieval (revisited Oxford / Paris) with the frozen features of a pretrained "
        "encoder.", EXAMPLE, data=False, training=False, throughput=False,
    )  # fmt: skip
    parser.add_argument("--dump-features", metavar="PATH", help="save the features to PATH (RETRIEVAL.DUMP_FEATURES)")
    parser.add_argument(
        "--load-features", metavar="PATH",
        help="read the features from PATH instead of computing them; no encoder needed (RETRIEVAL.LOAD_FEATURES)",
    )  # fmt: skip
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_option()  # --help and a wrong flag answer before torch loads

import math
import os
import time

from checkpoint import read_checkpoint, save_atomic
from cli import open_output, run_cli
from config import ConfigError, check_config, get_config
from data.build import resolve_num_workers
from data.retrieval import RetrievalImages, check_retrieval_name, read_ground_truth
from distributed import join_processes
from evaluation.retrieval import (
    MultiScale,
    protocol_ground_truth,
    rank_database,
    retrieval_features,
    revisited_map,
)
from metrics import MetricWriter
from models import build_encoder
from models.input_size import AnySizeEncoder
from precision import amp_autocast
from pretrained import inherit_encoder_settings, load_run_encoder


def output_folder(config):
    """<output>/<MODEL.NAME>/<tag>/retrieval_<dataset>: the log, config.json and TensorBoard scalars."""
    return os.path.join(config.OUTPUT, f"retrieval_{config.DATA.DATASET.lower()}")


def compute_features(config, env, logger, ground_truth, name, held=None):
    """(query features [Q, D], database features [N, D], pretraining epoch) of the run's encoder."""
    device = env.device
    backbone = build_encoder(config, drop_path_rate=0.0)
    epoch = load_run_encoder(backbone, config, logger, held)
    encoder = AnySizeEncoder(backbone).to(device)
    model = MultiScale(encoder) if config.RETRIEVAL.MULTISCALE else encoder
    root, max_side, crop = config.DATA.TRANSFER_ROOT, config.RETRIEVAL.IMG_SIZE, config.RETRIEVAL.CROP_QUERIES
    queries = RetrievalImages.queries(root, name, ground_truth, max_side, encoder.input_size, crop=crop)
    database = RetrievalImages.database(root, name, ground_truth, max_side, encoder.input_size)
    logger.info(
        f"{name}: {len(database)} database images, {len(queries)} queries "
        f"({'cropped to their boxes' if crop else 'whole'}); longest side at most {max_side} px, "
        f"{'scales 1, 1/sqrt(2), 1/2' if config.RETRIEVAL.MULTISCALE else 'one scale'}"
    )
    start = time.time()
    common = dict(
        batch_size=config.DATA.BATCH_SIZE,
        num_workers=resolve_num_workers(config.DATA.NUM_WORKERS),
        device=device,
        autocast=amp_autocast(config, device),
    )
    query_feats = retrieval_features(model, queries, **common)
    database_feats = retrieval_features(model, database, **common)
    logger.info(f"features {list(query_feats.shape)} of the queries, {list(database_feats.shape)} of the database "
                f"in {time.time() - start:.1f} s")  # fmt: skip
    return query_feats, database_feats, epoch


def save_features(path, name, ground_truth, query_feats, database_feats, config):
    save_atomic(
        {
            "dataset": name,
            "imlist": list(ground_truth["imlist"]),
            "qimlist": list(ground_truth["qimlist"]),
            "queries": query_feats.cpu(),
            "database": database_feats.cpu(),
            "encoder": config.MODEL.ENCODER,
            "retrieval": {k: config.RETRIEVAL[k] for k in ("IMG_SIZE", "MULTISCALE", "CROP_QUERIES")},
        },
        path,
    )


def load_features(path, name, ground_truth, device):
    """(query features, database features) saved by --dump-features for the same images."""
    if not os.path.isfile(path):
        raise ConfigError(f"no features file at {path} (--load-features): write one with --dump-features")
    saved = read_checkpoint(path)
    if not isinstance(saved, dict) or not {"dataset", "queries", "database"} <= set(saved):
        raise ConfigError(f"{path} is not a features file of eval_retrieval.py --dump-features")
    if (saved["dataset"], saved.get("imlist"), saved.get("qimlist")) != (
        name, list(ground_truth["imlist"]), list(ground_truth["qimlist"])):  # fmt: skip
        raise ConfigError(f"{path} holds features of {saved['dataset']}'s images, not of {name}'s")
    return saved["queries"].to(device), saved["database"].to(device)


def main(config, env, logger, ground_truth, held=None):
    name = config.DATA.DATASET.lower()
    epoch = None
    if config.RETRIEVAL.LOAD_FEATURES:
        query_feats, database_feats = load_features(config.RETRIEVAL.LOAD_FEATURES, name, ground_truth, env.device)
        logger.info(f"read the features of {config.RETRIEVAL.LOAD_FEATURES}")
    else:
        query_feats, database_feats, epoch = compute_features(config, env, logger, ground_truth, name, held)
        if config.RETRIEVAL.DUMP_FEATURES and env.is_main:
            save_features(config.RETRIEVAL.DUMP_FEATURES, name, ground_truth, query_feats, database_feats, config)
            logger.info(f"saved the features to {config.RETRIEVAL.DUMP_FEATURES}")

    ranking = rank_database(query_feats, database_feats)
    results = {}
    for setting in ("medium", "hard"):
        mean_ap, aps = revisited_map(ranking, protocol_ground_truth(ground_truth["gnd"], setting))
        results[setting] = 100 * mean_ap
        scored = sum(not math.isnan(ap) for ap in aps)  # nan: a query without positives in this setting
        logger.info(f"{name} {setting}: mAP {results[setting]:.2f} over {scored} queries")
    logger.info(f"{name} mAP (revisited protocol): medium {results['medium']:.2f} hard {results['hard']:.2f}")
    with MetricWriter(output_folder(config), config.TENSORBOARD and env.is_main, logger) as writer:
        writer.scalars({f"mAP_{s}": v for s, v in results.items()}, epoch or 0, prefix=f"retrieval/{name}/")
    return results


def setup(argv=None):
    args = parse_option(argv)
    config = get_config(args)
    check_config(config)
    try:
        check_retrieval_name(config.DATA.DATASET)
    except ValueError as e:
        raise ConfigError(f"{e} (--opts DATA.DATASET roxford5k)") from None
    try:  # before the checkpoint and any folder: missing data leaves nothing behind
        ground_truth = read_ground_truth(config.DATA.TRANSFER_ROOT, config.DATA.DATASET.lower())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    env = join_processes(config, args.local_rank)
    # saved features need no encoder, nor its checkpoint
    held, inherited = (None, []) if config.RETRIEVAL.LOAD_FEATURES else inherit_encoder_settings(config, args, env)
    logger = open_output(config, env, output_folder(config), f"{config.MODEL.NAME}_retrieval", inherited)
    return config, env, logger, ground_truth, held


if __name__ == "__main__":
    run_cli(setup, main)
