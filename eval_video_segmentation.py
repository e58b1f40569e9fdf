"""DAVIS 2017 semi-supervised video object segmentation by label propagation on the frozen
features of a pretrained encoder (DINO's protocol).

    torchrun --nproc_per_node=4 eval_video_segmentation.py --cfg configs/synco_vit_small.yaml \
        --output output --tag run1 [--opts DATA.TRANSFER_ROOT ./data DAVIS.SPLIT val]

Each video's first-frame mask is given; the labels of every later frame come from the first
frame and the 7 frames before it, through the top-5 most similar feature cells within 12 cells
(``evaluation/video_segmentation.py``). The predicted masks are written as palette PNGs in
DAVIS's layout, ``<output>/<MODEL.NAME>/<tag>/davis_<split>/<video>/<frame>.png``, and scored
with the benchmark's J (region IoU), F (boundary F-measure) and J&F (``evaluation/davis_metrics.py``).
The processes share the videos (video i on rank i mod world size) and gather the scores.
"""

from cli import build_parser

EXAMPLE = (
    "torchrun --nproc_per_node=4 eval_video_segmentation.py --cfg configs/synco_vit_small.yaml "
    "--output output --tag run1 --opts DATA.TRANSFER_ROOT ./data"
)


def parse_option(argv=None):
    parser = build_parser(
        "eval_video_segmentation.py",
        "DAVIS 2017 video object segmentation by label propagation on the frozen features of a pretrained encoder.",
        EXAMPLE,
        data=False,
        training=False,
        throughput=False,
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_option()  # --help and a wrong flag answer before torch loads

import csv
import os
import time

import numpy as np
import torch

from cli import open_output, run_cli
from config import ConfigError, check_config, get_config
from data.davis import davis_root, read_videos, write_palette_png
from distributed import get_world_size, join_processes
from evaluation.davis_metrics import score_frame, summarize
from evaluation.video_segmentation import PropagationSettings, segment_video
from metrics import MetricWriter
from models import build_encoder
from models.patch_features import PatchFeatures
from precision import amp_autocast
from pretrained import inherit_encoder_settings, load_run_encoder


def output_folder(config):
    return os.path.join(config.OUTPUT, f"davis_{config.DAVIS.SPLIT}")


def evaluate_video(video, features, settings, folder, device, autocast):
    """Segment ``video``, write its masks into ``folder``; returns [(object id, mean J, mean F)] over
    the annotated frames between the first and the last (empty when none is annotated)."""
    os.makedirs(folder, exist_ok=True)
    _, palette = video.read_mask(0)
    object_ids = video.object_ids()
    scores = []  # [(J, F) of each object] per scored frame
    for index, mask in segment_video(video, features, settings, device, autocast):
        name = os.path.splitext(os.path.basename(video.frames[index]))[0]
        write_palette_png(os.path.join(folder, f"{name}.png"), mask, palette)
        if 0 < index < len(video.frames) - 1 and video.annotations[index] is not None:
            scores.append(score_frame(mask, video.read_mask(index)[0], object_ids))
    if not scores:
        return []
    means = np.mean(scores, axis=0)  # [objects, 2]
    return [(object_id, float(j), float(f)) for object_id, (j, f) in zip(object_ids, means)]


def main(config, env, logger, videos, held=None):
    device = env.device
    autocast = amp_autocast(config, device)
    split = config.DAVIS.SPLIT
    encoder = build_encoder(config, drop_path_rate=0.0)
    epoch = load_run_encoder(encoder, config, logger, held)
    try:
        features = PatchFeatures(encoder.to(device))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    d = config.DAVIS
    settings = PropagationSettings(d.N_LAST_FRAMES, d.NEIGHBORHOOD, d.TOPK, d.TEMPERATURE, d.SHORT_SIDE)
    logger.info(f"DAVIS 2017 {split}: {len(videos)} videos; {settings}; features: {features.description}")

    start, frames = time.time(), 0
    mine = []  # (video position, object id, mean J, mean F)
    for position in range(env.rank, len(videos), env.world_size):
        video = videos[position]
        objects = evaluate_video(
            video, features, settings, os.path.join(output_folder(config), video.name), device, autocast
        )
        frames += len(video.frames)
        mine += [(position, *obj) for obj in objects]
        if objects:
            score = summarize([(j, f) for _, j, f in objects])
            logger.info(
                f"{video.name}: {len(video.frames)} frames, {len(objects)} objects: "
                + " ".join(f"{k} {v:.2f}" for k, v in score.items())
            )
    logger.info(f"rank {env.rank}: {frames} frames in {time.time() - start:.0f} s")

    gathered = [mine]
    if get_world_size() > 1:
        gathered = [None] * get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
    objects = sorted(obj for part in gathered for obj in part)
    if not objects:
        logger.info(f"no annotated frames to score in DAVIS 2017 {split}; masks written to {output_folder(config)}")
        return {}
    results = summarize([(j, f) for _, _, j, f in objects])
    logger.info(
        f"DAVIS 2017 {split} ({len(objects)} objects in {len({obj[0] for obj in objects})} videos): "
        + " ".join(f"{k} {v:.2f}" for k, v in results.items())
    )
    if env.is_main:
        with open(os.path.join(output_folder(config), "per_object.csv"), "w", newline="") as f:
            table = csv.writer(f)
            table.writerow(["Sequence", "J-Mean", "F-Mean"])
            table.writerows([f"{videos[p].name}_{i}", f"{j:.6f}", f"{fm:.6f}"] for p, i, j, fm in objects)
        with MetricWriter(output_folder(config), config.TENSORBOARD, logger) as writer:
            writer.scalars(results, step=epoch or 0, prefix=f"davis_{split}/")  # the pretraining epoch
    return results


def setup(argv=None):
    args = parse_option(argv)
    config = get_config(args)
    check_config(config)
    # before the checkpoint and any folder: missing data leaves nothing behind
    videos = read_videos(davis_root(config.DATA.TRANSFER_ROOT), config.DAVIS.SPLIT)
    env = join_processes(config, args.local_rank)
    held, inherited = inherit_encoder_settings(config, args, env)
    logger = open_output(config, env, output_folder(config), f"{config.MODEL.NAME}_davis", inherited)
    return config, env, logger, videos, held


if __name__ == "__main__":
    run_cli(setup, main)
