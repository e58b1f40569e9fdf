"""Self-supervised pretraining of Swin / ViT backbones with MoBY, BYOL or SynCo.

    torchrun --nproc_per_node=4 main_pretrain.py --cfg configs/synco_swin_tiny.yaml \
        --data-path /path/to/imagenet --batch-size 128 --output output --tag run1

``python -m torch.distributed.launch ...`` and a plain ``python main_pretrain.py ...``
(one process) work the same way.
"""

import datetime
import os
import time
from contextlib import nullcontext

import torch
from timm.utils import AverageMeter

from config import ConfigError, check_config, get_config, inert_settings
from data import DeviceAugment, DeviceViews, build_loader, set_loader_epoch, skipped_samples
from data.augment import synthetic_views
from data.build import dist_rank_world
from engine import (
    CheckpointWriteError,
    NonFiniteLossError,
    StopSignal,
    amp_autocast,
    build_parser,
    distribute,
    join_processes,
    memory_mb,
    open_output,
    process_fault,
    report_throughput,
    run_cli,
    save_checkpoints,
    scale_learning_rates,
    seed_step,
    unwrap,
)
from lr_scheduler import build_scheduler
from metrics import NULL_WRITER, SYNCO_METRICS, DeviceMeters, MetricWriter, contrastive_metrics
from models import build_model
from optimizer import build_optimizer
from utils import (
    LATEST,
    all_reduce_mean,
    make_latest,
    newest_checkpoint,
    read_checkpoint,
    remove_stale_tmp,
    seed_everything,
    world_size,
)

EXAMPLE = (
    "torchrun --nproc_per_node=8 main_pretrain.py --cfg configs/synco_swin_tiny.yaml "
    "--data-path /path/to/imagenet --batch-size 64 --output output --tag run1"
)


def parse_option(argv=None):
    parser = build_parser(
        "main_pretrain.py", "Self-supervised pretraining of a backbone with MoBY, BYOL or SynCo.", EXAMPLE
    )
    return parser.parse_args(argv)


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


def sync_ranks(first_bad, num_steps, epoch, stop_requested=False):
    """Where the ranks meet inside an epoch (when logging, and before a periodic save): stop
    every rank when any rank saw a non-finite loss or gradient norm this epoch, and return
    whether any rank was asked to stop (StopSignal), so that all stop after the same step.

    ``first_bad`` [2]: the first step with a non-finite loss and gradient norm on this rank
    (``num_steps`` when none). One collective and one synchronisation, so the training step
    itself never waits for the device.
    """
    state = torch.cat([first_bad, first_bad.new_tensor([0 if stop_requested else 1])])
    if world_size() > 1:
        torch.distributed.all_reduce(state, op=torch.distributed.ReduceOp.MIN)
    bad_loss, bad_grad, go_on = state.tolist()
    if bad_loss < num_steps:
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch} step {bad_loss}")
    if bad_grad < num_steps:
        raise NonFiniteLossError(f"non-finite gradient norm at epoch {epoch} step {bad_grad}")
    return not go_on


def log_progress(config, epoch, idx, num_steps, meters, batch_time, optimizer, model, logger, writer):
    """Log step ``idx`` of ``epoch``: its values and the epoch's means so far (reads the device)."""
    read = meters.read()
    nan = (float("nan"), float("nan"))
    (loss_val, loss_avg), (norm_val, norm_avg) = read["loss"], read.get("grad_norm", nan)
    (acc1_val, acc1_avg), (acc5_val, acc5_avg) = read.get("contrast_acc1", nan), read.get("contrast_acc5", nan)
    synco = [name for name in SYNCO_METRICS if name in read]  # SynCo's; synthetic_above_positive while on
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
        f"mem {memory_mb(next(model.parameters()).device):.0f}MB\t"
        f"contrast_acc1 {acc1_val:.3f} ({acc1_avg:.3f})\t"
        f"contrast_acc5 {acc5_val:.3f} ({acc5_avg:.3f})"
        + "".join(f"\t{name} {read[name][0]:.3f} ({read[name][1]:.3f})" for name in synco)
    )
    values = {"loss": loss_val, "lr": lr, "grad_norm": norm_val}
    if "contrast_acc1" in read:
        values.update(contrast_acc1=acc1_val, contrast_acc5=acc5_val)
    values.update({name: read[name][0] for name in synco})
    if hasattr(unwrap(model), "momentum"):
        values["momentum"] = unwrap(model).momentum
    writer.scalars(values, epoch * num_steps + idx, prefix="train/")


def train_one_epoch(
    config, model, batches, optimizer, lr_scheduler, scaler, autocast, epoch, device, logger, writer=NULL_WRITER,
    start_step=0, meters=None, stop=None, checkpointer=None,
):  # fmt: skip
    """One epoch over ``batches`` (a ``DeviceViews``: pairs of model inputs on ``device``), from
    ``start_step`` on with the epoch's ``meters`` so far (``batches`` then yields the steps left).

    The step reads nothing back from the device: losses and accuracies accumulate there
    and are read when logged (every PRINT_FREQ steps), when non-finite values are checked too
    and ``stop`` (a StopSignal) agreed on. Every TRAIN.SAVE_EVERY_STEPS steps, and where the
    ranks agree to stop, ``checkpointer`` saves the position. Returns (steps of the epoch
    done, whether the run stops).
    """
    model.train()
    num_steps = start_step + len(batches)
    rank = dist_rank_world()[0]
    accumulation = max(config.TRAIN.ACCUMULATION_STEPS, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    batch_time, meters = AverageMeter(), meters or DeviceMeters()
    # first step with a non-finite loss, and gradient norm (fp16 overflows are the grad scaler's to skip)
    first_bad = torch.full((2,), num_steps, dtype=torch.long, device=device)
    save_every = config.TRAIN.SAVE_EVERY_STEPS

    optimizer.zero_grad(set_to_none=True)
    start = end = time.time()
    step, stopping = start_step, False  # the step being loaded or run; whether the ranks agreed to stop
    try:
        for idx, (x1, x2) in enumerate(batches, start=start_step):  # [B, 3, H, W] each
            seed_step(config, epoch, idx, rank)
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
                meters.update(**contrastive_metrics(out["logits"], out["labels"], out.get("real_columns")))
            batch_time.update(time.time() - end)
            end = time.time()

            last = idx + 1 == num_steps
            save_due = save_every > 0 and (epoch * num_steps + idx + 1) % save_every == 0 and not last
            if idx % config.PRINT_FREQ == 0 or last or save_due:
                stopping = sync_ranks(first_bad, num_steps, epoch, stop is not None and stop.requested)
                if idx % config.PRINT_FREQ == 0 or last:
                    log_progress(config, epoch, idx, num_steps, meters, batch_time, optimizer, model, logger, writer)
                if (save_due or stopping) and not last:
                    checkpointer.save(epoch, idx + 1, meters)
                if stopping and not last:
                    return idx + 1, True
            step = idx + 1
    except (NonFiniteLossError, CheckpointWriteError):
        raise
    except RuntimeError as e:  # DistBackendError, and the loader's error for a dead worker
        fault = process_fault(e, config, epoch, step)
        if fault is None:
            raise
        raise fault from None
    epoch_time = time.time() - start
    read = meters.read()
    mean_loss = all_reduce_mean(torch.tensor(read["loss"][1], device=device)).item()
    acc1_avg = read.get("contrast_acc1", (0.0, 0.0))[1]
    # SynCo: its top-1 among the queue alone, and its synthetic logits above the positive (while on)
    synco = "".join(f"{n} {read[n][1]:.3f} " for n in ("contrast_acc1_real", "synthetic_above_positive") if n in read)
    images_per_s = (num_steps - start_step) * config.DATA.BATCH_SIZE * world_size() / max(epoch_time, 1e-9)
    epoch_values = {"loss": mean_loss, "time": epoch_time, "images_per_s": images_per_s}
    writer.scalars(epoch_values, (epoch + 1) * num_steps - 1, prefix="epoch/")  # the epoch's last step
    logger.info(
        f"EPOCH {epoch} done in {datetime.timedelta(seconds=int(epoch_time))}: mean loss {mean_loss:.4f} "
        f"contrast_acc1 {acc1_avg:.3f} {synco}"
        f"images/s {images_per_s:.1f} (all processes)"
    )
    return num_steps, stopping


def throughput(config, model, augment, optimizer, scaler, autocast, device, logger):
    """Images/s of full training steps (the device's share of the augmentation, forward,
    backward, optimizer step, momentum update) on synthetic batches of the configured size."""
    model.train()
    views = [(images.to(device), params) for images, params in synthetic_views(config)]

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


class Checkpointer:
    """Saves the training state on rank 0 (``save``, called by every rank) and knows the last
    good checkpoint on every rank."""

    def __init__(self, config, env, model, optimizer, lr_scheduler, scaler, last_good, logger):
        self.config, self.env, self.logger = config, env, logger
        self.model, self.optimizer, self.lr_scheduler, self.scaler = model, optimizer, lr_scheduler, scaler
        self.last_good = last_good

    def save(self, epoch, step=None, meters=None):
        """Save after ``epoch``, or, with ``step``, after ``step`` steps of it (with the epoch's
        ``meters``): ``ckpt_epoch_{epoch}.pth`` when due (at ends of epochs), then ``checkpoint.pth``.
        Every rank raises when the weights are not finite or rank 0 could not write (one collective)."""
        config, model = self.config, self.model
        where = f"after epoch {epoch}" if step is None else f"at epoch {epoch} step {step}"
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise NonFiniteLossError(f"non-finite weights {where}")
        state = {
            "model": unwrap(model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch if step is None else epoch - 1,  # the last epoch done in full
            "framework": {"type": config.MODEL.TYPE, "encoder": config.MODEL.ENCODER},
            "config": config.dump(),
        }
        paths = [os.path.join(config.OUTPUT, LATEST)]  # last: see newest_checkpoint
        if step is not None:
            state.update(epoch_step=step, meters=meters.state_dict())
        elif epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
            paths.insert(0, os.path.join(config.OUTPUT, f"ckpt_epoch_{epoch}.pth"))
        self.last_good = save_checkpoints(state, paths, self.last_good, self.env, self.logger)


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
    # read first: the repair below may replace the file when it is the folder's checkpoint.pth
    resumed = read_checkpoint(config.MODEL.RESUME, config.TRUST_CHECKPOINT) if config.MODEL.RESUME else None
    newest_path, newest = None, None
    if env.is_main:  # the only writer here: no other rank may delete its temporary files
        remove_stale_tmp(config.OUTPUT, logger)
        newest_path, newest = newest_checkpoint(config.OUTPUT, logger, config.TRUST_CHECKPOINT)
        if newest is not None:
            try:
                make_latest(newest_path, newest["epoch"], config.OUTPUT, logger)
            except OSError as e:
                raise CheckpointWriteError(
                    f"could not write {os.path.join(config.OUTPUT, 'checkpoint.pth')} ({e.strerror or e}); "
                    f"the last good checkpoint is {newest_path}: free space in {config.OUTPUT} (or fix it), "
                    "then resume"
                ) from None
    if env.world_size > 1:
        torch.distributed.barrier()  # the other ranks read the folder as rank 0 left it
        if not env.is_main:
            newest_path, newest = newest_checkpoint(config.OUTPUT, logger, config.TRUST_CHECKPOINT)

    if config.MODEL.RESUME:
        path, ckpt = config.MODEL.RESUME, resumed
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
    start_step = ckpt.get("epoch_step", 0) if ckpt is not None else 0  # a checkpoint saved inside an epoch
    if newest is not None and (newest["epoch"] + 1, newest.get("epoch_step", 0)) > (start_epoch, start_step):
        start = f"--resume {path}" if path else "TRAIN.AUTO_RESUME False"
        raise ConfigError(
            f"{newest_path} already holds epoch {newest['epoch']}, and this run would train again from epoch "
            f"{start_epoch} ({start}): "
            "resumes and evaluations would read that newer checkpoint instead of this run's; pass another "
            f"--output or --tag, or move checkpoint.pth and ckpt_epoch_E.pth for E >= {start_epoch} out of "
            f"{config.OUTPUT}"
        )
    return start_epoch, start_step, path, ckpt


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
    start_epoch, start_step, last_good, ckpt = config.TRAIN.START_EPOCH, 0, None, None
    if not config.THROUGHPUT_MODE:
        start_epoch, start_step, last_good, ckpt = resume_point(config, env, logger)
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

    meters = DeviceMeters()  # of the epoch a checkpoint saved inside of
    if ckpt is not None:
        restore(last_good, ckpt, model, optimizer, scaler, logger)
        if start_step:
            meters.load_state_dict(ckpt["meters"], device)
        del ckpt  # a second copy of every state, on the CPU
    # a resumed run hides the steps an interrupted one logged after its checkpoint
    writer = MetricWriter(
        config.OUTPUT, config.TENSORBOARD and env.is_main, logger, start_epoch * steps_per_epoch + start_step
    )
    checkpointer = Checkpointer(config, env, model, optimizer, lr_scheduler, scaler, last_good, logger)
    stop = StopSignal()

    # ---------------------------------------------------------------- loop
    logger.info("start training" + (f" at epoch {start_epoch} step {start_step}" if start_step else ""))
    start = time.time()
    for epoch in range(start_epoch, config.TRAIN.EPOCHS):
        set_loader_epoch(data_loader, epoch, start_step)
        try:
            steps_done, stopping = train_one_epoch(
                config, model, batches, optimizer, lr_scheduler, scaler, autocast, epoch, device, logger, writer,
                start_step, meters, stop, checkpointer,
            )  # fmt: skip
            if steps_done == steps_per_epoch:
                logger.info(f"epoch {epoch}: skipped {skipped_samples(data_loader)} unreadable images")
                checkpointer.save(epoch)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(
                f"{e}; nothing was saved, the last good checkpoint is {checkpointer.last_good or 'none'}: "
                "lower TRAIN.BASE_LR or set TRAIN.CLIP_GRAD, then resume"
            ) from None
        if stopping:
            logger.info(
                f"stopped by a signal at epoch {epoch} step {steps_done}: saved {checkpointer.last_good}; "
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
    if not config.THROUGHPUT_MODE and not config.DATA.DATA_PATH:
        raise ConfigError("no dataset given: pass --data-path <folder with train/ and val/>")
    env = join_processes(config, args.local_rank)
    check_batch(config, env.world_size)
    scale_learning_rates(config, env.world_size)
    logger = open_output(
        config, env, config.OUTPUT, config.MODEL.NAME, warnings=inert_settings(config, pretraining=True)
    )
    return config, env, logger


if __name__ == "__main__":
    run_cli(setup, main)
