"""Linear probing or fine-tuning of a pretrained backbone on ImageNet or a transfer dataset.

    torchrun --nproc_per_node=4 main_linear.py --cfg configs/moby_swin_tiny.yaml \
        --data-path /path/to/imagenet --output output --tag run1 [--opts DATA.DATASET cifar10]

Reads the online encoder (``encoder.*``) of the newest readable checkpoint of the run folder
``<output>/<MODEL.NAME>/<tag>/`` (or of LINEAR_EVAL.PRETRAINED) and writes to
``.../linear_<dataset>_<linprob|ft>/``.
"""

from cli import build_parser, in_range
from config import get_config

# The linear-evaluation recipe the original ran: defaults over the pretraining YAML, under --opts.
# The keys only evaluation reads keep their defaults in config.py: MODEL.DROP_PATH_RATE 0.2,
# MODEL.LABEL_SMOOTHING 0.1, LINEAR_EVAL.BACKBONE_TRAIN_MODE True.
LINEAR_RECIPE = [
    "DATA.BATCH_SIZE", 64,  # per process (the original's default; its scripts ran 4 GPUs)
    "TRAIN.EPOCHS", 100,
    "TRAIN.WARMUP_EPOCHS", 5,
    "TRAIN.BASE_LR", 1.0,  # per 512 images, like the two below (scaled by the global batch)
    "TRAIN.WARMUP_LR", 5e-7,
    "TRAIN.MIN_LR", 5e-6,
    "TRAIN.WEIGHT_DECAY", 0.0,
    "TRAIN.CLIP_GRAD", 5.0,
    "TRAIN.OPTIMIZER.NAME", "sgd",
    "TRAIN.OPTIMIZER.MOMENTUM", 0.9,
    "TRAIN.LR_SCHEDULER.NAME", "cosine",
    "AUG.SSL_LINEAR_AUG", True,
]  # fmt: skip


EXAMPLE = (
    "torchrun --nproc_per_node=4 main_linear.py --cfg configs/synco_swin_tiny.yaml "
    "--data-path /path/to/imagenet --output output --tag run1"
)


def parse_option(argv=None):
    parser = build_parser(
        "main_linear.py",
        "Linear probing (or fine-tuning) of the encoder of a pretraining run, on ImageNet or a transfer dataset.",
        EXAMPLE,
        defaults=get_config(recipe=LINEAR_RECIPE),
    )
    parser.add_argument("--eval", action="store_true", help="only evaluate the trained classifier of the run folder")
    parser.add_argument(
        "--lr",
        type=in_range("TRAIN.BASE_LR", float),
        help="base learning rate per 512 images (TRAIN.BASE_LR; default 1.0)",
    )
    parser.add_argument(
        "--drop-path-rate",
        type=in_range("MODEL.DROP_PATH_RATE", float),
        help="drop path rate of the backbone (MODEL.DROP_PATH_RATE; default 0.2)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_option()  # --help and a wrong flag answer before torch loads

import os

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from checkpoint import Checkpointer, restore, resume_point
from cli import open_output, run_cli
from config import ConfigError, check_config, inert_settings
from data import build_linear_loaders, set_loader_epoch, skipped_samples
from data.linear import canonical_dataset_name, check_imagenet_files
from distributed import distribute, join_processes, unwrap
from engine import measure_throughput, train_classifier_one_epoch, validate
from faults import StopSignal
from lr_scheduler import build_scheduler
from metrics import MetricWriter
from models import build_encoder
from optimizer import build_optimizer
from precision import amp_autocast, build_optimizer_step
from pretrained import inherit_encoder_settings, load_run_encoder
from utils import scale_learning_rates, seed_epoch, seed_everything

# -----------------------------------------------------------------------------
# Pretrained weights
# -----------------------------------------------------------------------------


def build_classifier(config, num_classes, freeze):
    """The backbone with a fresh linear head (N(0, 0.01) weights, zero bias); with ``freeze``
    only the head is trainable."""
    model = build_encoder(config, drop_path_rate=config.MODEL.DROP_PATH_RATE, num_classes=num_classes)
    head = model.get_classifier()
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    if freeze:
        freeze_backbone(model)
    return model


def freeze_backbone(model):
    """Make only the head (``model.get_classifier()``) of ``model`` trainable."""
    for p in model.parameters():
        p.requires_grad = False
    for p in model.get_classifier().parameters():
        p.requires_grad = True


def set_training_mode(model, freeze, backbone_train_mode):
    """The modes of ``model``'s modules while it trains.

    Fine-tuning: everything in train mode. Probing (``freeze``): the backbone in train mode
    when ``backbone_train_mode`` (its drop path then perturbs the frozen features, as in the
    original), else in eval mode; BatchNorm layers of the frozen backbone in eval mode either
    way, so their running statistics stay those of pretraining; the head in train mode.
    """
    model.train(not freeze or backbone_train_mode)
    if freeze:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
        unwrap(model).get_classifier().train()


@torch.no_grad()
def throughput(config, model, device, autocast, logger):
    """Images/s of the backbone in inference at the configured batch and image size."""
    model.eval()
    size = config.DATA.IMG_SIZE
    images = torch.randn(config.DATA.BATCH_SIZE, 3, size, size, device=device)

    def inference_step():
        with autocast():
            model(images)

    measure_throughput(config, inference_step, images.shape[0], device, logger)


# -----------------------------------------------------------------------------
# Main
# -----------------------------------------------------------------------------


def main(config, env, logger, output_dir, held=None):
    """Train (or with --eval, evaluate) the classifier; returns the best val top-1 in %."""
    device = env.device
    freeze = config.LINEAR_EVAL.WEIGHTS == "freeze"
    autocast = amp_autocast(config, device)

    # ---------------------------------------------------------------- data
    try:
        train_set, val_set, train_loader, val_loader, num_classes = build_linear_loaders(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    logger.info(f"{config.DATA.DATASET}: {len(train_set)} train / {len(val_set)} val images, {num_classes} classes")

    # ---------------------------------------------------------------- model
    seed_everything(config.SEED)
    model = build_classifier(config, num_classes, freeze)
    if not config.THROUGHPUT_MODE:
        load_run_encoder(model, config, logger, held)
    model.to(device)
    if config.THROUGHPUT_MODE:
        throughput(config, model, device, autocast, logger)
        return
    optimizer = build_optimizer(config, model)
    model = distribute(model, env)  # fine-tuned BatchNorms (ResNets) normalise over the global batch
    lr_scheduler = build_scheduler(config, optimizer, len(train_loader))
    optimizer_step = build_optimizer_step(config, model, optimizer, device, track_norm=False)
    scaler = optimizer_step.scaler

    # ---------------------------------------------------------------- resume
    start_epoch, _, path, ckpt = resume_point(config, env, logger, output_dir)
    max_acc1 = 0.0
    if ckpt is not None:
        restore(path, ckpt, model, optimizer=optimizer, scaler=scaler)
        max_acc1 = ckpt["max_accuracy"]
        logger.info(f"resumed from {path} (epoch {ckpt['epoch']}, best top-1 {max_acc1:.2f}%)")
    elif config.EVAL_MODE:
        raise ConfigError(f"--eval: no trained classifier in {output_dir}; train it first or pass --resume")

    if config.EVAL_MODE:
        acc1, acc5, loss = validate(model, val_loader, device, autocast)
        logger.info(f"{config.DATA.DATASET} val ({len(val_set)} images): top-1 {acc1:.2f}% top-5 {acc5:.2f}%")
        return acc1
    if start_epoch >= config.TRAIN.EPOCHS:
        logger.info(
            f"run complete: all {config.TRAIN.EPOCHS} epochs already trained, checkpoint {path} "
            f"(best top-1 {max_acc1:.2f}%); nothing to do"
        )
        return max_acc1

    # ---------------------------------------------------------------- loop
    steps = len(train_loader)
    checkpointer = Checkpointer(env, logger, last_good=path)  # the checkpoint a restart would resume from
    writer = MetricWriter(output_dir, config.TENSORBOARD and env.is_main, logger, purge_step=start_epoch * steps)
    stop = StopSignal(env.store)
    for epoch in range(start_epoch, config.TRAIN.EPOCHS):
        seed_epoch(config, epoch, env.rank)
        set_loader_epoch(train_loader, epoch)
        set_training_mode(model, freeze, config.LINEAR_EVAL.BACKBONE_TRAIN_MODE)
        steps_done, stopping = train_classifier_one_epoch(
            config, model, train_loader, optimizer_step, lr_scheduler, autocast, epoch, logger, writer, stop
        )
        if steps_done < steps:  # stopped inside the epoch, which is trained again from its start
            saved = f"the last checkpoint is {checkpointer.last_good}" if checkpointer.last_good else "nothing saved"
            logger.info(
                f"stopped by {stop.name} at epoch {epoch} step {steps_done}: {saved}; the same command trains "
                f"epoch {epoch} again"
            )
            break
        if skipped := skipped_samples(train_loader):
            logger.info(f"epoch {epoch}: skipped {skipped} unreadable training images (each replaced by another)")
        acc1, acc5, loss = validate(model, val_loader, device, autocast)
        max_acc1 = max(max_acc1, acc1)
        writer.scalars({"top1": acc1, "top5": acc5, "loss": loss}, (epoch + 1) * steps - 1, prefix="val/")
        logger.info(
            f"EPOCH {epoch} {config.DATA.DATASET} val ({len(val_set)} images): top-1 {acc1:.2f}% "
            f"top-5 {acc5:.2f}% loss {loss:.4f}; best top-1 {max_acc1:.2f}%"
        )
        state = {
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "max_accuracy": max_acc1,
            "accuracy": {"top1": acc1, "top5": acc5},
            "config": config.dump(),
            "world_size": env.world_size,  # the learning rates in the config are scaled by the global batch
        }
        checkpointer.save(state, [os.path.join(output_dir, "checkpoint.pth")])
        if stopping:
            logger.info(f"stopped by {stop.name} after epoch {epoch}: the same command resumes from epoch {epoch + 1}")
            break
    writer.close()
    logger.info(f"best top-1 {max_acc1:.2f}%")
    return max_acc1


def setup(argv=None):
    args = parse_option(argv)
    config = get_config(args, recipe=LINEAR_RECIPE)
    check_config(config)
    if config.DATA.DATASET in ("imagenet", "imagenet100") and not config.DATA.DATA_PATH:
        raise ConfigError("no dataset given: pass --data-path <folder with train/ and val/>")
    check_imagenet_files(config)  # before the checkpoint and any folder: missing data leaves nothing behind
    env = join_processes(config, args.local_rank)
    held, inherited = inherit_encoder_settings(config, args, env)
    scale_learning_rates(config, env.world_size)
    kind = "linprob" if config.LINEAR_EVAL.WEIGHTS == "freeze" else "ft"
    try:
        dataset = canonical_dataset_name(config.DATA.DATASET)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    output_dir = os.path.join(config.OUTPUT, f"linear_{dataset}_{kind}")
    logger = open_output(
        config, env, output_dir, f"{config.MODEL.NAME}_linear", inherited, inert_settings(config, pretraining=False)
    )
    return config, env, logger, output_dir, held


if __name__ == "__main__":
    run_cli(setup, main)
