"""Self-supervised pretraining of Swin / ViT backbones with MoBY, BYOL or SynCo.

    torchrun --nproc_per_node=4 main_pretrain.py --cfg configs/synco_swin_tiny.yaml \
        --data-path /path/to/imagenet --batch-size 128 --output output --tag run1

``python -m torch.distributed.launch ...`` and a plain ``python main_pretrain.py ...``
(one process) work the same way.
"""

from cli import build_parser
from config import get_config

EXAMPLE = (
    "torchrun --nproc_per_node=8 main_pretrain.py --cfg configs/synco_swin_tiny.yaml "
    "--data-path /path/to/imagenet --batch-size 64 --output output --tag run1"
)


def parse_option(argv=None):
    parser = build_parser(
        "main_pretrain.py", "Self-supervised pretraining of a backbone with MoBY, BYOL or SynCo.", EXAMPLE
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_option()  # --help and a wrong flag answer before torch loads

import datetime
import os
import time

import torch

from checkpoint import LATEST, Checkpointer, restore, resume_point
from cli import open_output, run_cli
from config import ConfigError, check_config, inert_settings
from data import DeviceAugment, DeviceViews, build_loader, set_loader_epoch, skipped_samples
from data.build import check_split
from data.linear import IMAGENET_DATASETS, canonical_dataset_name
from distributed import distribute, get_world_size, join_processes, unwrap
from engine import measure_throughput, synthetic_train_step, train_one_epoch
from faults import NonFiniteLossError, StopSignal
from lr_scheduler import build_scheduler
from metrics import DeviceMeters, MetricWriter
from models import build_model
from monitor import Monitors
from optimizer import build_optimizer
from precision import amp_autocast, build_optimizer_step
from utils import scale_learning_rates, seed_everything


def check_batch(config, world_size, dataset_size=None):
    """Errors for a global batch that the queue or the dataset cannot take."""
    global_batch = config.DATA.BATCH_SIZE * world_size
    queue = config.MODEL.CONTRAST_NUM_NEGATIVE
    if config.MODEL.TYPE in ("moby", "synco") and queue % global_batch:
        raise ConfigError(
            f"MODEL.CONTRAST_NUM_NEGATIVE {queue} is not a multiple of the global batch "
            f"{config.DATA.BATCH_SIZE} x {world_size} processes = {global_batch}: change --batch-size "
            f"or the number of processes so that their product divides {queue}, or set "
            f"MODEL.CONTRAST_NUM_NEGATIVE to a multiple of {global_batch}"
        )
    if dataset_size is not None and dataset_size < global_batch:
        raise ConfigError(
            f"the global batch {global_batch} ({config.DATA.BATCH_SIZE} x {world_size} processes) is larger "
            f"than the training set ({dataset_size} images): lower --batch-size"
        )


def throughput(config, model, augment, optimizer_step, autocast, device, logger):
    """Images/s of ``synthetic_train_step``."""
    step = synthetic_train_step(config, model, augment, optimizer_step, autocast, device)
    measure_throughput(config, step, config.DATA.BATCH_SIZE, device, logger)


# -----------------------------------------------------------------------------
# Main
# -----------------------------------------------------------------------------


def training_state(config, model, optimizer, lr_scheduler, scaler, monitors, epoch, step=None, meters=None):
    """The checkpoint after ``epoch``, or, with ``step``, after ``step`` steps of it (with the
    epoch's ``meters``); the monitors' state under "monitor", beside the model's. Raises
    NonFiniteLossError when the weights are not finite."""
    where = f"after epoch {epoch}" if step is None else f"at epoch {epoch} step {step}"
    if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():  # one synchronisation
        raise NonFiniteLossError(f"non-finite weights {where}")
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch if step is None else epoch - 1,  # the last epoch done in full
        "framework": {"type": config.MODEL.TYPE, "encoder": config.MODEL.ENCODER},
        "config": config.dump(),
        "world_size": get_world_size(),  # the learning rates in the config are scaled by the global batch
        "monitor": monitors.state_dict(),
    }
    if step is not None:
        state.update(epoch_step=step, meters=meters.state_dict())
    return state


def checkpoint_paths(config, epoch, inside_epoch=False):
    """``ckpt_epoch_{epoch}.pth`` when due (at ends of epochs), then ``checkpoint.pth`` (last: see
    checkpoint.newest_checkpoint)."""
    paths = [os.path.join(config.OUTPUT, LATEST)]
    if not inside_epoch and (epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1):
        paths.insert(0, os.path.join(config.OUTPUT, f"ckpt_epoch_{epoch}.pth"))
    return paths


def main(config, env, logger):
    device = env.device
    autocast = amp_autocast(config, device)
    augment = DeviceAugment(gpu_aug=config.DATA.GPU_AUG)

    # ---------------------------------------------------------------- resume point
    start_epoch, start_step, last_good, ckpt = config.TRAIN.START_EPOCH, 0, None, None
    if not config.THROUGHPUT_MODE:
        start_epoch, start_step, last_good, ckpt = resume_point(config, env, logger, config.OUTPUT)
        if ckpt is not None and start_epoch >= config.TRAIN.EPOCHS:
            logger.info(
                f"run complete: all {config.TRAIN.EPOCHS} epochs already trained, checkpoint {last_good} "
                f"(epoch {ckpt['epoch']}); nothing to do"
            )
            return

    # ---------------------------------------------------------------- data
    if config.THROUGHPUT_MODE:
        data_loader, steps_per_epoch = None, 10**9  # synthetic batches, all in epoch 0
        if config.MODEL.TYPE == "synco":  # measure SynCo's steps, synthetic negatives on
            config.defrost()
            config.MODEL.SYNTHETIC_START_EPOCH, config.MODEL.SYNTHETIC_END_EPOCH = 0, config.TRAIN.EPOCHS - 1
            config.freeze()
            logger.info("throughput of SynCo's steps with synthetic negatives")
    else:
        dataset, data_loader = build_loader(config)
        batches = DeviceViews(data_loader, augment, device)
        check_batch(config, env.world_size, len(dataset))
        steps_per_epoch = len(data_loader)
        logger.info(f"{len(dataset)} training images, {steps_per_epoch} steps per epoch per process")
        queue = config.MODEL.CONTRAST_NUM_NEGATIVE
        if config.MODEL.TYPE in ("moby", "synco") and queue > len(dataset) and env.is_main:
            logger.warning(
                f"MODEL.CONTRAST_NUM_NEGATIVE {queue} is larger than the training set ({len(dataset)} images): the "
                "queue holds several keys of each image, its own positive's among a query's negatives; set it to "
                f"at most {len(dataset)} (a multiple of the global batch)"
            )

    # ---------------------------------------------------------------- model
    seed_everything(config.SEED)  # same initial weights and queues on every rank
    model = build_model(config, steps_per_epoch).to(device)
    if config.TRAIN.COMPILE:
        model.encoder.compile()  # in place: parameter names and checkpoints stay the same
        model.encoder_k.compile()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"{config.MODEL.TYPE} with {config.MODEL.ENCODER}: {n_params / 1e6:.2f}M trainable parameters")
    optimizer = build_optimizer(config, model)
    model = distribute(model, env, broadcast_buffers=False)
    lr_scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    optimizer_step = build_optimizer_step(config, model, optimizer, device)
    scaler = optimizer_step.scaler

    if config.THROUGHPUT_MODE:
        throughput(config, model, augment, optimizer_step, autocast, device, logger)
        return

    encoder = unwrap(model).encoder
    monitors = Monitors.build(config, env, logger, dataset, encoder.num_features)
    if config.MODEL.TYPE == "synco":
        logger.info(
            "contrast_acc1: the positive's top-1 among the queue and the synthetic negatives (near 0 while "
            "they are on, by design); contrast_acc1_real: among the queue alone, MoBY's measure"
        )
    meters = DeviceMeters()  # of the epoch a checkpoint saved inside of
    if ckpt is not None:
        restore(last_good, ckpt, model, optimizer=optimizer, scaler=scaler)
        monitors.load_state_dict(ckpt.get("monitor"))
        logger.info(f"resumed from {last_good} (epoch {ckpt['epoch']})")
        if start_step:
            meters.load_state_dict(ckpt["meters"], device)
        del ckpt  # a second copy of every state, on the CPU
    # a resumed run hides the steps an interrupted one logged after its checkpoint
    writer = MetricWriter(
        config.OUTPUT, config.TENSORBOARD and env.is_main, logger, start_epoch * steps_per_epoch + start_step
    )
    checkpointer = Checkpointer(env, logger, last_good)

    def save(epoch, step=None, meters=None):
        state = training_state(config, model, optimizer, lr_scheduler, scaler, monitors, epoch, step, meters)
        checkpointer.save(state, checkpoint_paths(config, epoch, inside_epoch=step is not None))

    stop = StopSignal(env.store)

    # ---------------------------------------------------------------- loop
    if last_good is None:  # a fresh run: the initial encoder
        monitors.before_training(encoder, autocast, writer)
    logger.info("start training" + (f" at epoch {start_epoch} step {start_step}" if start_step else ""))
    start = time.time()
    for epoch in range(start_epoch, config.TRAIN.EPOCHS):
        set_loader_epoch(data_loader, epoch, start_step)
        try:
            steps_done, stopping = train_one_epoch(
                config, model, batches, optimizer_step, lr_scheduler, autocast, epoch, logger, writer,
                start_step, meters, stop, save, monitors,
            )  # fmt: skip
            if steps_done == steps_per_epoch:
                if skipped := skipped_samples(data_loader):
                    logger.info(f"epoch {epoch}: skipped {skipped} unreadable images")
                save(epoch)
                monitors.end_epoch(epoch, encoder, autocast, writer, (epoch + 1) * steps_per_epoch - 1)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(
                f"{e}; nothing was saved, the last good checkpoint is {checkpointer.last_good or 'none'}: "
                "lower TRAIN.BASE_LR or set TRAIN.CLIP_GRAD, then resume"
            ) from None
        if stopping:
            logger.info(
                f"stopped by {stop.name} at epoch {epoch} step {steps_done}: saved {checkpointer.last_good}; "
                "the same command resumes there"
            )
            break
        start_step, meters = 0, DeviceMeters()
    writer.close()
    logger.info(f"training time {datetime.timedelta(seconds=int(time.time() - start))}")


def setup(argv=None):
    """Parse, configure and validate everything that can fail before training starts."""
    args = parse_option(argv)
    config = get_config(args)
    check_config(config)
    if config.EVAL_MODE:
        raise ConfigError("--eval evaluates a linear classifier: use main_linear.py")
    if not config.AUG.SSL_AUG:
        raise ConfigError("pretraining needs the two-view augmentation: set AUG.SSL_AUG True")
    try:
        imagenet = canonical_dataset_name(config.DATA.DATASET) in IMAGENET_DATASETS
    except ValueError as e:  # a retrieval set
        raise ConfigError(str(e)) from None
    if not config.THROUGHPUT_MODE and imagenet:  # a transfer set is checked, or downloaded, when it is built
        if not config.DATA.DATA_PATH:
            raise ConfigError("no dataset given: pass --data-path <folder with train/ and val/>")
        check_split(config, "train")  # before the run folder exists: a wrong --data-path leaves nothing
    env = join_processes(config, args.local_rank)
    check_batch(config, env.world_size)
    scale_learning_rates(config, env.world_size)
    logger = open_output(
        config, env, config.OUTPUT, config.MODEL.NAME, warnings=inert_settings(config, pretraining=True)
    )
    return config, env, logger


if __name__ == "__main__":
    run_cli(setup, main)
