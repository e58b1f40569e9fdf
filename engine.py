"""The training and evaluation loops: a pretraining epoch, a classifier epoch, exact validation,
frozen features, and throughput.

No loop reads a value back from the device per step: losses and accuracies accumulate there
(``metrics.MetricLogger``) and are read where the ranks meet anyway, at the logged steps, where
non-finite values are checked and a stop signal agreed on (``sync_ranks``).
"""

import datetime
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from checkpoint import CheckpointWriteError
from data.augment import synthetic_views
from data.cached_image_folder import UnreadableImageError
from distributed import all_reduce_mean, get_rank, get_world_size, unwrap
from faults import NonFiniteLossError, ProcessFaultError, process_fault
from metrics import NULL_WRITER, MetricLogger, contrastive_metrics, count_correct, metric_format
from utils import memory_mb, seed_step


class FirstNonFinite:
    """The first step of an epoch whose value was not finite, kept on the device: ``check(value, idx)``
    never synchronises; ``sync_ranks`` reads it."""

    def __init__(self, num_steps, device):
        self.num_steps = num_steps
        self.step = torch.full((), num_steps, dtype=torch.long, device=device)

    def check(self, value, idx):
        self.step = torch.where(torch.isfinite(value.detach()), self.step, self.step.clamp(max=idx))


def sync_ranks(checks, epoch, stop_requested=False):
    """Where the ranks meet inside an epoch (when logging, and before a periodic save): stop every
    rank when any rank saw a non-finite value this epoch, and return whether any rank was asked to
    stop (StopSignal), so that all stop after the same step.

    ``checks``: {what: FirstNonFinite}. One collective and one synchronisation.
    """
    steps = [check.step for check in checks.values()]
    continuing = torch.full_like(steps[0], 0 if stop_requested else 1)
    state = torch.stack(steps + [continuing])  # the minimum over the ranks of each
    if get_world_size() > 1:
        torch.distributed.all_reduce(state, op=torch.distributed.ReduceOp.MIN)
    *first_non_finite, all_continue = state.tolist()
    for (what, check), step in zip(checks.items(), first_non_finite):
        if step < check.num_steps:
            raise NonFiniteLossError(f"non-finite {what} at epoch {epoch} step {step}")
    return not all_continue


def _as_process_fault(error, config, epoch, step):
    """``error`` (a RuntimeError met in a loop) as a one-line ProcessFaultError when it is a fault of
    the processes (a dead data loader worker, a lost or stalled peer), else itself (an unreadable
    image among them: a worker that raises is not a worker that died)."""
    if isinstance(error, (NonFiniteLossError, ProcessFaultError, CheckpointWriteError, UnreadableImageError)):
        return error
    return process_fault(error, config, epoch, step) or error


# -----------------------------------------------------------------------------
# Pretraining
# -----------------------------------------------------------------------------


def train_one_epoch(config, model, batches, optimizer_step, lr_scheduler, autocast, epoch, logger,
                    writer=NULL_WRITER, start_step=0, meters=None, stop=None, save_position=None,
                    monitors=None):  # fmt: skip
    """One pretraining epoch over ``batches`` (the model's two inputs and the labels, on the
    model's device), from ``start_step`` on with the epoch's ``meters`` so far (``batches`` then
    yields the steps left). ``monitors`` (monitor.Monitors) trains its online classifier each step.

    ``optimizer_step``: a precision.OptimizerStep. At the logged steps the ranks meet
    (``sync_ranks``): non-finite losses and gradient norms stop the run, and ``stop`` (a
    StopSignal) is agreed on. Every TRAIN.SAVE_EVERY_STEPS steps, and where the ranks agree to
    stop, ``save_position(epoch, steps done, meters)`` saves. Returns (steps of the epoch done,
    whether the run stops).
    """
    model.train()
    device = next(model.parameters()).device
    num_steps = start_step + len(batches)
    rank = get_rank()
    metric_logger = MetricLogger(
        logger, f"Train: [{epoch}/{config.TRAIN.EPOCHS}]", num_steps, config.PRINT_FREQ, start_step, meters,
        steps_after=(config.TRAIN.EPOCHS - epoch - 1) * num_steps, first_step=epoch * num_steps, writer=writer,
        memory=lambda: memory_mb(device),
    )  # fmt: skip
    # fp16 overflows of the gradient norm are the grad scaler's to skip
    checks = {"loss": FirstNonFinite(num_steps, device)}
    if not optimizer_step.scaler.is_enabled():
        checks["gradient norm"] = FirstNonFinite(num_steps, device)
    save_every = config.TRAIN.SAVE_EVERY_STEPS

    optimizer_step.optimizer.zero_grad(set_to_none=True)
    start = time.time()
    step, stopping = start_step, False  # the step being loaded or run; whether the ranks agreed to stop
    try:
        for idx, (x1, x2, targets) in metric_logger.log_every(batches):  # [B, 3, H, W] each, [B]
            seed_step(config, epoch, idx, rank)
            lr_scheduler.step_update(epoch * num_steps + idx)
            update = optimizer_step.is_update(idx, num_steps)
            no_sync = getattr(model, "no_sync", None)
            with no_sync() if (no_sync is not None and not update) else nullcontext():
                with autocast():
                    out = model(x1, x2)
                grad_norm = optimizer_step(out["loss"], update)
            checks["loss"].check(out["loss"], idx)
            metric_logger.update(loss=out["loss"])
            if grad_norm is not None:
                if "gradient norm" in checks:
                    checks["gradient norm"].check(grad_norm, idx)
                metric_logger.update(grad_norm=grad_norm)
            if "logits" in out:
                metric_logger.update(**contrastive_metrics(out["logits"], out["labels"], out.get("real_columns")))
            metric_logger.update(**{name: out[name] for name in ("batch_acc1", "proj_std") if name in out})
            if monitors is not None:
                metric_logger.update(**monitors.train_step(out["features"], targets))

            last = idx + 1 == num_steps
            save_due = save_every > 0 and (epoch * num_steps + idx + 1) % save_every == 0 and not last
            if metric_logger.due(idx) or save_due:
                stopping = sync_ranks(checks, epoch, stop is not None and stop.requested)
                if metric_logger.due(idx):
                    values = {"lr": optimizer_step.optimizer.param_groups[0]["lr"]}
                    if hasattr(unwrap(model), "momentum"):
                        values["momentum"] = unwrap(model).momentum
                    metric_logger.log(idx, **values)
                if (save_due or stopping) and not last:
                    save_position(epoch, idx + 1, metric_logger.meters)
                if stopping and not last:
                    return idx + 1, True
            step = idx + 1
    except RuntimeError as e:  # DistBackendError, and the loader's error for a dead worker
        fault = _as_process_fault(e, config, epoch, step)
        if fault is e:
            raise
        raise fault from None
    epoch_time = time.time() - start
    read = metric_logger.read()
    mean_loss = all_reduce_mean(torch.tensor(read["loss"][1], device=device)).item()
    means = {name: read[name][1] for name in EPOCH_MEANS if name in read}  # this rank's
    images_per_s = (num_steps - start_step) * config.DATA.BATCH_SIZE * get_world_size() / max(epoch_time, 1e-9)
    epoch_values = {"loss": mean_loss, **means, "time": epoch_time, "images_per_s": images_per_s}
    writer.scalars(epoch_values, (epoch + 1) * num_steps - 1, prefix="epoch/")  # the epoch's last step
    logger.info(
        f"EPOCH {epoch} done in {datetime.timedelta(seconds=int(epoch_time))}: mean loss {mean_loss:.4f} "
        + "".join(f"{name} {value:{metric_format(name)}} " for name, value in means.items())
        + f"images/s {images_per_s:.1f} (all processes)"
    )
    return num_steps, stopping


# The epoch means in the line that ends a pretraining epoch (those the framework and monitors log)
EPOCH_MEANS = ("contrast_acc1", "contrast_acc1_real", "synthetic_above_positive", "batch_acc1", "linear_acc1",
               "proj_std")  # fmt: skip


# -----------------------------------------------------------------------------
# Classifier (linear probe or fine-tuning)
# -----------------------------------------------------------------------------


def classification_loss(logits, targets, smoothing):
    """Cross-entropy with label smoothing ``s``, in fp32: per sample
    ``(1 - s) * -log p[target] + s * mean_k(-log p[k])`` (timm's LabelSmoothingCrossEntropy,
    the original's loss), averaged over the batch. [B, C], [B] -> scalar."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)


def train_classifier_one_epoch(config, model, data_loader, optimizer_step, lr_scheduler, autocast, epoch, logger,
                               writer=NULL_WRITER, stop=None):  # fmt: skip
    """One epoch of the classifier ``model`` (its modules' modes set by the caller) with
    label-smoothed cross-entropy. At the logged steps the ranks meet: a non-finite loss stops
    every rank, and so does ``stop`` (a StopSignal). Returns (steps done, whether the run stops)."""
    device = next(model.parameters()).device
    num_steps = len(data_loader)
    metric_logger = MetricLogger(
        logger, f"Train: [{epoch}/{config.TRAIN.EPOCHS}]", num_steps, config.PRINT_FREQ,
        steps_after=(config.TRAIN.EPOCHS - epoch - 1) * num_steps, first_step=epoch * num_steps, writer=writer,
        memory=lambda: memory_mb(device),
    )  # fmt: skip
    checks = {"loss": FirstNonFinite(num_steps, device)}
    start = time.time()
    step, stopping = 0, False
    try:
        for idx, (images, targets) in metric_logger.log_every(data_loader):
            lr_scheduler.step_update(epoch * num_steps + idx)
            images = images.to(device, non_blocking=True)  # [B, 3, H, W]
            targets = targets.to(device, non_blocking=True)  # [B]
            with autocast():
                loss = classification_loss(model(images), targets, config.MODEL.LABEL_SMOOTHING)
            optimizer_step(loss, optimizer_step.is_update(idx, num_steps))
            checks["loss"].check(loss, idx)
            metric_logger.update(loss=loss)
            if metric_logger.due(idx):
                stopping = sync_ranks(checks, epoch, stop is not None and stop.requested)
                metric_logger.log(idx, lr=optimizer_step.optimizer.param_groups[0]["lr"])
                if stopping and idx + 1 < num_steps:
                    return idx + 1, True
            step = idx + 1
    except RuntimeError as e:
        fault = _as_process_fault(e, config, epoch, step)
        if fault is e:
            raise
        raise fault from None
    logger.info(f"EPOCH {epoch} training took {datetime.timedelta(seconds=int(time.time() - start))}")
    return num_steps, stopping


@torch.no_grad()
def validate(model, data_loader, device, autocast):
    """Exact top-1 / top-5 (in %) and mean loss over the whole validation set: the counts of
    every rank are summed, so uneven shards weigh each sample once."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, n, loss sum
    for images, targets in data_loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        c1, c5 = count_correct(logits.float(), targets)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        totals += torch.tensor([c1, c5, targets.shape[0], loss.item()], dtype=torch.float64, device=device)
    if get_world_size() > 1:
        torch.distributed.all_reduce(totals)
    c1, c5, n, loss_sum = totals.tolist()
    n = max(n, 1)
    return 100.0 * c1 / n, 100.0 * c5 / n, loss_sum / n


# -----------------------------------------------------------------------------
# Frozen features
# -----------------------------------------------------------------------------


@torch.no_grad()
def extract_features(model, data_loader, num_samples, rank, device, autocast, order=None, gather=True):
    """Normalised features [num_samples, D] and labels [num_samples] of the whole dataset on
    every rank, from a loader over this rank's samples: ``order``, the dataset index of each
    sample in the order the loader yields them, by default ``rank, rank + world, ...``.

    ``gather=False``: only this rank's shard, as (features [n, D], labels [n], dataset index
    [n]); nothing is exchanged, and no rank holds more than its share."""
    model.eval()
    feats, labels = [], []
    for images, targets in data_loader:
        with autocast():
            out = model(images.to(device, non_blocking=True))
        feats.append(F.normalize(out.float(), dim=1))
        labels.append(targets.to(device))
    feats, labels = torch.cat(feats), torch.cat(labels)
    world = get_world_size()
    if world == 1 and order is None and gather:
        return feats, labels
    if order is None:
        index = torch.arange(rank, num_samples, world, device=device)
    else:
        index = torch.as_tensor(order, dtype=torch.long, device=device)
    if not gather:
        return feats, labels, index
    all_feats = feats.new_zeros(num_samples, feats.shape[1])
    all_labels = labels.new_zeros(num_samples)
    all_feats[index], all_labels[index] = feats, labels
    if world > 1:
        torch.distributed.all_reduce(all_feats)
        torch.distributed.all_reduce(all_labels)
    return all_feats, all_labels


# -----------------------------------------------------------------------------
# Throughput
# -----------------------------------------------------------------------------


def synthetic_train_step(config, model, augment, optimizer_step, autocast, device):
    """A full pretraining step (the device's share of the augmentation, forward, backward,
    optimizer step, momentum update) on synthetic batches of the configured size, as a function
    of no arguments: what main_pretrain.py --throughput and benchmarks/bench_gpu.py time."""
    model.train()
    views = [(images.to(device), params) for images, params in synthetic_views(config)]

    def train_step():
        x1, x2 = (augment(images, params) for images, params in views)
        with autocast():
            loss = model(x1, x2)["loss"]
        optimizer_step(loss)

    return train_step


def measure_throughput(config, step, batch_size, device, logger, warmup=3, steps=10):
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
