"""Self-supervised pretraining of Swin / ViT backbones with MoBY, BYOL or SynCo.

    torchrun --nproc_per_node=4 main_pretrain.py --cfg configs/synco_swin_tiny.yaml \
        --data-path /path/to/imagenet --batch-size 128 --output output --tag run1

``python -m torch.distributed.launch ...`` and a plain ``python main_pretrain.py ...``
(one process) work the same way.
"""

import argparse
import datetime
import json
import os
import resource
import sys
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import yaml
from timm.utils import AverageMeter, accuracy

from config import ConfigError, check_config, get_config
from data import DeviceAugment, DeviceViews, build_loader, set_loader_epoch, skipped_samples
from data.augment import build_recipes, sample_view
from logger import create_logger
from lr_scheduler import build_scheduler
from metrics import NULL_WRITER, DeviceMeters, MetricWriter
from models import build_model
from optimizer import build_optimizer
from utils import (
    all_reduce_mean,
    init_distributed,
    make_latest,
    newest_checkpoint,
    read_checkpoint,
    remove_stale_tmp,
    save_atomic,
    seed_everything,
    world_size,
)

AMP_DTYPES = {"O1": torch.float16, "O2": torch.bfloat16}


def build_parser(description):
    """The flags main_pretrain.py and main_linear.py share."""
    parser = argparse.ArgumentParser(description)
    parser.add_argument("--cfg", type=str, required=True, metavar="FILE", help="path to the config file")
    parser.add_argument("--opts", default=None, nargs="+", help="override config options: KEY VALUE pairs")
    parser.add_argument("--batch-size", type=int, help="batch size per GPU (process)")
    parser.add_argument("--data-path", type=str, help="ImageNet-style folder with train/ and val/")
    parser.add_argument("--zip", action="store_true", help="read train.zip + train_map.txt")
    parser.add_argument("--cache-mode", type=str, choices=["no", "full", "part"], help="zip mode cache")
    parser.add_argument("--resume", help="resume from this checkpoint")
    parser.add_argument("--accumulation-steps", type=int, help="gradient accumulation steps")
    parser.add_argument("--use-checkpoint", action="store_true", help="gradient checkpointing to save memory")
    parser.add_argument(
        "--amp-opt-level",
        type=str,
        choices=["O0", "O1", "O2"],
        help="mixed precision: O0 fp32, O1 fp16 with a grad scaler, O2 bf16",
    )
    parser.add_argument("--output", type=str, metavar="PATH", help="root of output folder: <output>/<name>/<tag>")
    parser.add_argument("--tag", help="tag of the experiment")
    parser.add_argument("--eval", action="store_true", help="evaluation only (main_linear.py)")
    parser.add_argument("--throughput", action="store_true", help="measure training images/s and exit")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle checkpoints in full (can run code): only for files you trust",
    )
    # torch.distributed.launch passes --local-rank (or --local_rank); torchrun sets LOCAL_RANK
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None)
    return parser


def parse_option(argv=None):
    return build_parser("Self-supervised pretraining (MoBY / BYOL / SynCo)").parse_args(argv)


def amp_autocast(config, device):
    """A context factory: autocast to AMP_OPT_LEVEL's dtype (O1 fp16, O2 bf16), or nothing."""
    return partial(
        torch.autocast,
        device_type=device.type,
        dtype=AMP_DTYPES.get(config.AMP_OPT_LEVEL),
        enabled=config.AMP_OPT_LEVEL in AMP_DTYPES,
    )


def report_throughput(config, step, batch_size, device, logger, warmup=3, steps=10):
    """Time ``steps`` calls of ``step()`` after ``warmup`` ones; print ``throughput: <images/s>``."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    images_per_s = steps * batch_size / (time.time() - start)
    logger.info(f"batch {batch_size} x {config.DATA.IMG_SIZE}px, {steps} steps after {warmup} warm-up steps")
    print(f"throughput: {images_per_s:.2f}", flush=True)


def memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def distribute(model, env, **ddp_kwargs):
    """``model`` in DistributedDataParallel when there are several processes. On CUDA every
    BatchNorm (the heads', a ResNet's) first becomes a SyncBatchNorm, normalising over the
    global batch; the parameters stay the same objects, so an optimizer built before keeps them."""
    if env.world_size == 1:
        return model
    cuda = env.device.type == "cuda"
    if cuda:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if cuda else None, **ddp_kwargs)


def scale_learning_rates(config, world_size):
    """Linear scaling rule: the configured rates are for a global batch of 512."""
    scale = config.DATA.BATCH_SIZE * world_size / 512.0 * max(config.TRAIN.ACCUMULATION_STEPS, 1)
    config.defrost()
    config.TRAIN.BASE_LR *= scale
    config.TRAIN.WARMUP_LR *= scale
    config.TRAIN.MIN_LR *= scale
    config.freeze()


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


def seed_epoch(config, epoch, rank):
    """Every random stream of an epoch is a pure function of (SEED, epoch, rank), so a
    run resumed at an epoch boundary draws exactly what an uninterrupted one would."""
    seed_everything(int(np.random.SeedSequence([config.SEED, epoch, rank]).generate_state(1)[0]))


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """The loss, gradients or weights stopped being finite."""


def check_finite(first_bad, num_steps, epoch):
    """Stop every rank when any rank saw a non-finite loss or gradient norm this epoch.

    ``first_bad`` [2]: the first step with a non-finite loss and gradient norm on this rank
    (``num_steps`` when none). One collective and one synchronisation, so the training step
    itself never waits for the device; called when logging and at the end of the epoch.
    """
    first_bad = first_bad.clone()
    if world_size() > 1:
        torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
    bad_loss, bad_grad = first_bad.tolist()
    if bad_loss < num_steps:
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch} step {bad_loss}")
    if bad_grad < num_steps:
        raise NonFiniteLossError(f"non-finite gradient norm at epoch {epoch} step {bad_grad}")


def train_one_epoch(
    config, model, batches, optimizer, lr_scheduler, scaler, autocast, epoch, device, logger, writer=NULL_WRITER
):
    """One epoch over ``batches`` (a ``DeviceViews``: pairs of model inputs on ``device``).

    The step reads nothing back from the device: losses and accuracies accumulate there
    and are read when logged (every PRINT_FREQ steps), when non-finite values are checked too.
    """
    model.train()
    num_steps = len(batches)
    accumulation = max(config.TRAIN.ACCUMULATION_STEPS, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    batch_time, meters = AverageMeter(), DeviceMeters()
    # first step with a non-finite loss, and gradient norm (fp16 overflows are the grad scaler's to skip)
    first_bad = torch.full((2,), num_steps, dtype=torch.long, device=device)

    optimizer.zero_grad(set_to_none=True)
    start = end = time.time()
    for idx, (x1, x2) in enumerate(batches):  # [B, 3, H, W] each
        lr_scheduler.step_update(epoch * num_steps + idx)
        update = (idx + 1) % accumulation == 0 or idx + 1 == num_steps
        no_sync = getattr(model, "no_sync", None)
        with no_sync() if (no_sync is not None and not update) else nullcontext():
            with autocast():
                out = model(x1, x2)
            loss = out["loss"]
            scaler.scale(loss / accumulation).backward()
        first_bad[0] = torch.where(torch.isfinite(loss.detach()), first_bad[0], first_bad[0].clamp(max=idx))
        if update:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.TRAIN.CLIP_GRAD or float("inf"))
            if not scaler.is_enabled():
                first_bad[1] = torch.where(torch.isfinite(grad_norm), first_bad[1], first_bad[1].clamp(max=idx))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            meters.update(grad_norm=grad_norm)
        meters.update(loss=loss)
        if "logits" in out:
            acc1, acc5 = accuracy(out["logits"], out["labels"], topk=(1, 5))
            meters.update(contrast_acc1=acc1, contrast_acc5=acc5)
        batch_time.update(time.time() - end)
        end = time.time()

        if idx % config.PRINT_FREQ == 0 or idx + 1 == num_steps:
            check_finite(first_bad, num_steps, epoch)
            read = meters.read()
            nan = (float("nan"), float("nan"))
            (loss_val, loss_avg), (norm_val, norm_avg) = read["loss"], read.get("grad_norm", nan)
            (acc1_val, acc1_avg), (acc5_val, acc5_avg) = read.get("contrast_acc1", nan), read.get("contrast_acc5", nan)
            lr = optimizer.param_groups[0]["lr"]
            steps_left = num_steps - idx - 1
            eta = datetime.timedelta(seconds=int(batch_time.avg * steps_left))
            eta_run = datetime.timedelta(
                seconds=int(batch_time.avg * (steps_left + (config.TRAIN.EPOCHS - epoch - 1) * num_steps))
            )
            logger.info(
                f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{num_steps}]\t"
                f"eta {eta} (run {eta_run}) lr {lr:.4e}\t"
                f"time {batch_time.val:.4f} ({batch_time.avg:.4f})\t"
                f"loss {loss_val:.4f} ({loss_avg:.4f})\t"
                f"grad_norm {norm_val:.4f} ({norm_avg:.4f})\t"
                f"mem {memory_mb(device):.0f}MB\t"
                f"contrast_acc1 {acc1_val:.3f} ({acc1_avg:.3f})\t"
                f"contrast_acc5 {acc5_val:.3f} ({acc5_avg:.3f})"
            )
            values = {"loss": loss_val, "lr": lr, "grad_norm": norm_val}
            if "contrast_acc1" in read:
                values.update(contrast_acc1=acc1_val, contrast_acc5=acc5_val)
            if hasattr(unwrap(model), "momentum"):
                values["momentum"] = unwrap(model).momentum
            writer.scalars(values, epoch * num_steps + idx, prefix="train/")
    epoch_time = time.time() - start
    read = meters.read()
    mean_loss = all_reduce_mean(torch.tensor(read["loss"][1], device=device)).item()
    acc1_avg = read.get("contrast_acc1", (0.0, 0.0))[1]
    images_per_s = num_steps * config.DATA.BATCH_SIZE * world_size() / max(epoch_time, 1e-9)
    epoch_values = {"loss": mean_loss, "time": epoch_time, "images_per_s": images_per_s}
    writer.scalars(epoch_values, (epoch + 1) * num_steps - 1, prefix="epoch/")  # the epoch's last step
    logger.info(
        f"EPOCH {epoch} done in {datetime.timedelta(seconds=int(epoch_time))}: mean loss {mean_loss:.4f} "
        f"contrast_acc1 {acc1_avg:.3f} "
        f"images/s {images_per_s:.1f} (all processes)"
    )
    return mean_loss


def _synthetic_batch(config):
    """Two views of random uint8 pixels with augmentation parameters drawn from the
    configured recipes (for 500 x 375 images): ``[(images [B, 3, S, S], params [B, P])] * 2``."""
    size, batch = config.DATA.IMG_SIZE, config.DATA.BATCH_SIZE
    views = []
    for recipe in build_recipes(config.AUG.SSL_AUG_TYPE, config.AUG.SSL_AUG_CROP):
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        views.append((images, torch.stack([sample_view(recipe, 500, 375)[1] for _ in range(batch)])))
    return views


def throughput(config, model, augment, optimizer, scaler, autocast, device, logger):
    """Images/s of full training steps (the device's share of the augmentation, forward,
    backward, optimizer step, momentum update) on synthetic batches of the configured size."""
    model.train()
    views = [(images.to(device), params) for images, params in _synthetic_batch(config)]

    def train_step():
        x1, x2 = (augment(images, params) for images, params in views)
        with autocast():
            loss = model(x1, x2)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    report_throughput(config, train_step, config.DATA.BATCH_SIZE, device, logger)


# -----------------------------------------------------------------------------
# Main
# -----------------------------------------------------------------------------


def save_checkpoint(config, epoch, model, optimizer, lr_scheduler, scaler, logger):
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "framework": {"type": config.MODEL.TYPE, "encoder": config.MODEL.ENCODER},
        "config": config.dump(),
    }
    saved = []
    if epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
        saved.append(os.path.join(config.OUTPUT, f"ckpt_epoch_{epoch}.pth"))
    saved.append(os.path.join(config.OUTPUT, "checkpoint.pth"))  # last: see load_newest_checkpoint
    for path in saved:
        save_atomic(state, path)
    logger.info(f"saved {', '.join(saved)}")
    return saved[-1]


def resume_point(config, env, logger):
    """(first epoch to train, path, checkpoint) the run continues from; (TRAIN.START_EPOCH, None,
    None) when it starts afresh.

    Before anything else, rank 0 makes the run folder's ``checkpoint.pth`` a copy of its newest
    readable checkpoint (``newest_checkpoint``: the rule auto-resume and every evaluation read
    by), which a run killed between the two files of a save left behind. A start at an epoch
    not newer than that checkpoint (``--resume`` of an older file, or TRAIN.AUTO_RESUME False)
    is refused: the folder would name that checkpoint, not this run's, as its newest until
    this run caught up.
    """
    if config.MODEL.RESUME and not os.path.isfile(config.MODEL.RESUME):
        raise ConfigError(f"--resume {config.MODEL.RESUME}: no such file")
    newest_path, newest = None, None
    if env.is_main:  # the only writer here: no other rank may delete its temporary files
        remove_stale_tmp(config.OUTPUT, logger)
        newest_path, newest = newest_checkpoint(config.OUTPUT, logger, config.TRUST_CHECKPOINT)
        if newest is not None:
            make_latest(newest_path, newest["epoch"], config.OUTPUT, logger)
    if env.world_size > 1:
        torch.distributed.barrier()  # the other ranks read the folder as rank 0 left it
        if not env.is_main:
            newest_path, newest = newest_checkpoint(config.OUTPUT, logger, config.TRUST_CHECKPOINT)

    if config.MODEL.RESUME:
        path, ckpt = config.MODEL.RESUME, read_checkpoint(config.MODEL.RESUME, config.TRUST_CHECKPOINT)
    elif config.TRAIN.AUTO_RESUME:
        path, ckpt = newest_path, newest
        if ckpt is None:
            logger.info(f"no checkpoint in {config.OUTPUT}: training from scratch")
    else:
        path, ckpt = None, None

    if ckpt is not None:
        expected = {"type": config.MODEL.TYPE, "encoder": config.MODEL.ENCODER}
        found = ckpt.get("framework", expected)
        if found != expected:
            raise ConfigError(
                f"{path} was written by {found['type']} / {found['encoder']}, but the config asks for "
                f"{expected['type']} / {expected['encoder']}: pick the matching --cfg or another --output/--tag"
            )
    start_epoch = ckpt["epoch"] + 1 if ckpt is not None else config.TRAIN.START_EPOCH
    if newest is not None and newest["epoch"] >= start_epoch:
        start = f"--resume {path}" if path else "TRAIN.AUTO_RESUME False"
        raise ConfigError(
            f"{newest_path} already holds epoch {newest['epoch']}, and this run would train again from epoch "
            f"{start_epoch} ({start}): "
            "resumes and evaluations would read that newer checkpoint instead of this run's; pass another "
            f"--output or --tag, or move checkpoint.pth and ckpt_epoch_E.pth for E >= {start_epoch} out of "
            f"{config.OUTPUT}"
        )
    return start_epoch, path, ckpt


def restore(path, ckpt, model, optimizer, scaler, logger):
    """Load the model, optimizer and grad scaler states of the checkpoint ``ckpt`` read from ``path``."""
    try:
        unwrap(model).load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as e:
        details = " ".join(str(e).split())[:500]
        raise ConfigError(f"{path} does not fit this model ({details}): check the config it was written with") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    # the schedule is a pure function of the step and the config: its saved state is
    # for inspection, so a resume may change e.g. TRAIN.EPOCHS or TRAIN.BASE_LR
    scaler.load_state_dict(ckpt["scaler"])
    logger.info(f"resumed from {path} (epoch {ckpt['epoch']})")


def main(config, env, logger):
    device = env.device
    autocast = amp_autocast(config, device)
    augment = DeviceAugment(gpu_aug=config.DATA.GPU_AUG)

    # ---------------------------------------------------------------- resume point
    start_epoch, last_good, ckpt = config.TRAIN.START_EPOCH, None, None
    if not config.THROUGHPUT_MODE:
        start_epoch, last_good, ckpt = resume_point(config, env, logger)
        if ckpt is not None and start_epoch >= config.TRAIN.EPOCHS:
            logger.info(
                f"run complete: all {config.TRAIN.EPOCHS} epochs already trained, checkpoint {last_good} "
                f"(epoch {ckpt['epoch']}); nothing to do"
            )
            return

    # ---------------------------------------------------------------- data
    if config.THROUGHPUT_MODE:
        data_loader, steps_per_epoch = None, 10**9  # synthetic batches, all in epoch 0
    else:
        dataset, data_loader = build_loader(config)
        batches = DeviceViews(data_loader, augment, device)
        check_batch(config, env.world_size, len(dataset))
        steps_per_epoch = len(data_loader)
        logger.info(f"{len(dataset)} training images, {steps_per_epoch} steps per epoch per process")

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
    scaler = torch.amp.GradScaler(device.type, enabled=config.AMP_OPT_LEVEL == "O1")

    if config.THROUGHPUT_MODE:
        throughput(config, model, augment, optimizer, scaler, autocast, device, logger)
        return

    if ckpt is not None:
        restore(last_good, ckpt, model, optimizer, scaler, logger)
        del ckpt  # a second copy of every state, on the CPU
    # a resumed run hides the steps an interrupted one logged after its checkpoint
    writer = MetricWriter(config.OUTPUT, config.TENSORBOARD and env.is_main, logger, start_epoch * steps_per_epoch)

    # ---------------------------------------------------------------- loop
    logger.info("start training")
    start = time.time()
    for epoch in range(start_epoch, config.TRAIN.EPOCHS):
        seed_epoch(config, epoch, env.rank)
        set_loader_epoch(data_loader, epoch)
        try:
            train_one_epoch(
                config, model, batches, optimizer, lr_scheduler, scaler, autocast, epoch, device, logger, writer
            )
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise NonFiniteLossError(f"non-finite weights after epoch {epoch}")
        except NonFiniteLossError as e:
            raise NonFiniteLossError(
                f"{e}; nothing was saved, the last good checkpoint is {last_good or 'none'}: "
                "lower TRAIN.BASE_LR or set TRAIN.CLIP_GRAD, then resume"
            ) from None
        logger.info(f"epoch {epoch}: skipped {skipped_samples(data_loader)} unreadable images")
        if env.is_main:
            last_good = save_checkpoint(config, epoch, model, optimizer, lr_scheduler, scaler, logger)
    writer.close()
    logger.info(f"training time {datetime.timedelta(seconds=int(time.time() - start))}")


def open_output(config, env, folder, name):
    """Create ``folder`` with the per-rank logger, and the resolved config.json on rank 0."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output folder {folder}: {e.strerror}") from None
    logger = create_logger(folder, env.rank, name=name)
    if env.is_main:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(yaml.safe_load(config.dump()), f, indent=2)
        logger.info(f"full config saved to {os.path.join(folder, 'config.json')}")
    logger.info(f"rank {env.rank} of {env.world_size} on {env.device}")
    return logger


def join_processes(config, local_rank):
    """Join the process group; record the local rank in the config."""
    env = init_distributed(local_rank)
    config.defrost()
    config.LOCAL_RANK = env.local_rank
    config.freeze()
    return env


def setup(argv=None):
    """Parse, configure and validate everything that can fail before training starts."""
    args = parse_option(argv)
    config = get_config(args)
    check_config(config)
    if config.EVAL_MODE:
        raise ConfigError("--eval evaluates a linear classifier: use main_linear.py")
    if not config.AUG.SSL_AUG:
        raise ConfigError("pretraining needs the two-view augmentation: set AUG.SSL_AUG True")
    if not config.THROUGHPUT_MODE and not config.DATA.DATA_PATH:
        raise ConfigError("no dataset given: pass --data-path <folder with train/ and val/>")
    env = join_processes(config, args.local_rank)
    check_batch(config, env.world_size)
    scale_learning_rates(config, env.world_size)
    logger = open_output(config, env, config.OUTPUT, config.MODEL.NAME)
    return config, env, logger


def run_cli(setup_fn, main_fn, argv=None):
    """Run ``main_fn(*setup_fn(argv))``; expected failures print one line and exit 2."""
    rank = int(os.environ.get("RANK", 0))
    try:
        main_fn(*setup_fn(argv))
    except (ConfigError, FileNotFoundError, PermissionError, NonFiniteLossError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_cli(setup, main)
