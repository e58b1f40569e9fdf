"""TensorBoard scalars of a run, written by rank 0 into its output folder.

    writer = MetricWriter(config.OUTPUT, config.TENSORBOARD and env.is_main, logger, purge_step=step)
    writer.scalars({"loss": loss, "lr": lr}, step, prefix="train/")
    writer.close()

``tensorboard`` is optional: without it the writer logs one line and does nothing.
"""

import atexit
import datetime
import logging
import math
import time

import torch
from timm.utils import AverageMeter, accuracy


class MetricWriter:
    """``scalar(tag, value, step)`` into TensorBoard event files in ``output_dir``.

    A no-op when not ``enabled`` (every rank but 0, or TENSORBOARD False) and, after one
    logged line, when ``torch.utils.tensorboard`` cannot be imported. A run resumed at
    global step ``purge_step`` hides the events at steps >= it that an interrupted run
    left in the folder. Closed at exit if ``close()`` was not called, so a run that
    stops on an error keeps its last scalars.
    """

    def __init__(self, output_dir, enabled, logger=None, purge_step=None):
        self._writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # ImportError without tensorboard; a broken install may raise others
            reason = " ".join(str(e).split())
            (logger or logging.getLogger(__name__)).warning(
                f"no TensorBoard scalars: cannot import torch.utils.tensorboard ({reason}); "
                "pip install tensorboard, or set TENSORBOARD False"
            )
            return
        self._writer = SummaryWriter(output_dir, purge_step=purge_step)
        atexit.register(self.close)

    @property
    def enabled(self):
        """Whether scalars are written."""
        return self._writer is not None

    def scalar(self, tag, value, step):
        """Record ``value`` (a number or a one-element tensor) under ``tag`` at global ``step``."""
        if self._writer is not None:
            self._writer.add_scalar(tag, float(value), int(step))

    def scalars(self, values, step, prefix=""):
        """``scalar(prefix + tag, value, step)`` for each item of the dict ``values``."""
        for tag, value in values.items():
            self.scalar(prefix + tag, value, step)

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        """Flush and close the event file; later calls do nothing."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            atexit.unregister(self.close)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# the writer of functions called without one
NULL_WRITER = MetricWriter(None, enabled=False)


class DeviceMeters:
    """Last values and running means of per-step scalar tensors, kept on their device:
    ``update`` never synchronises the host with the device; ``read`` does, once for all.

    A mean is over the finite values only (an fp16 step the grad scaler skips has an infinite
    gradient norm, which would make the mean infinite for the rest of the epoch); the last value
    is the last one given, finite or not.
    """

    def __init__(self):
        self._last: dict[str, torch.Tensor] = {}
        self._sum: dict[str, torch.Tensor] = {}
        self._count: dict[str, torch.Tensor] = {}

    def update(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            value = value.detach().float()
            finite = torch.isfinite(value)
            self._last[name] = value
            self._sum[name] = torch.where(finite, value, 0.0) + self._sum.get(name, 0.0)
            self._count[name] = finite.float() + self._count.get(name, 0.0)

    def read(self) -> dict[str, tuple[float, float]]:
        """``{name: (last value, mean of the finite values; nan without one)}`` of every scalar updated so far."""
        names = list(self._last)
        if not names:
            return {}
        n = len(names)
        values = torch.stack([self._last[k] for k in names] + [self._sum[k] for k in names]
                             + [self._count[k] for k in names]).tolist()  # fmt: skip
        return {k: (values[i], values[n + i] / values[2 * n + i] if values[2 * n + i] else math.nan)
                for i, k in enumerate(names)}  # fmt: skip

    def state_dict(self) -> dict:
        """The meters as they stand (tensors on their device), for a checkpoint inside an epoch."""
        return {"last": dict(self._last), "sum": dict(self._sum), "count": dict(self._count)}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Continue from ``state_dict()``'s values, moved to ``device``."""
        self._last = {name: value.to(device) for name, value in state["last"].items()}
        self._sum = {name: value.to(device) for name, value in state["sum"].items()}
        # counts: tensors; plain ints in checkpoints of earlier versions
        self._count = {name: torch.as_tensor(count, dtype=torch.float32, device=device)
                       for name, count in state["count"].items()}  # fmt: skip


class MetricLogger:
    """The bookkeeping of a training loop: per-step scalars kept on the device (``DeviceMeters``:
    nothing waits for the device per step), the time of each step, and at the steps the loop
    chooses (``due``: every ``print_freq``-th and the last) one log line and TensorBoard scalars::

        metric_logger = MetricLogger(logger, f"Train: [{epoch}/{epochs}]", num_steps, config.PRINT_FREQ)
        for idx, batch in metric_logger.log_every(batches):
            ...
            metric_logger.update(loss=loss)
            if metric_logger.due(idx):
                metric_logger.log(idx, lr=optimizer.param_groups[0]["lr"])

    A loop resumed at ``start_step`` continues with the epoch's ``meters`` so far; ``steps_after``
    (the steps of the run's later epochs) extends the ETA to the whole run; ``first_step``: the
    global step of the epoch's step 0 (TensorBoard's x axis).
    """

    def __init__(self, logger, header, num_steps, print_freq, start_step=0, meters=None, steps_after=0,
                 first_step=0, writer=None, memory=None):  # fmt: skip
        self.logger, self.header, self.num_steps, self.print_freq = logger, header, num_steps, max(print_freq, 1)
        self.start_step, self.steps_after, self.first_step = start_step, steps_after, first_step
        self.meters = meters if meters is not None else DeviceMeters()
        self.writer = writer or NULL_WRITER
        self.memory = memory  # () -> peak memory in MiB, logged when given
        self.step_time = AverageMeter()
        self._step_start, self._timed = None, None

    def log_every(self, iterable):
        """Yield ``(idx, item)`` for the steps ``start_step ..`` of the epoch, timing each step."""
        for idx, item in enumerate(iterable, start=self.start_step):
            self._step_start, self._timed = time.time(), None
            yield idx, item
            self._time(idx)

    def _time(self, idx):
        if self._timed != idx:
            self.step_time.update(time.time() - self._step_start)
            self._timed = idx

    def update(self, **values):
        """Add the scalar tensors ``values`` of this step to the meters (no synchronisation)."""
        self.meters.update(**values)

    def due(self, idx):
        """Whether step ``idx`` is logged: every ``print_freq``-th step and the last."""
        return idx % self.print_freq == 0 or idx + 1 == self.num_steps

    def log(self, idx, **host_values):
        """One line for step ``idx``: ETA, ``host_values`` (``lr``, ...), the step time and each meter's
        last value and epoch mean (one read of the device), the peak memory; the same as
        TensorBoard scalars under ``train/``."""
        self._time(idx)
        read = self.meters.read()
        steps_left = self.num_steps - idx - 1
        eta = datetime.timedelta(seconds=int(self.step_time.avg * steps_left))
        eta_run = datetime.timedelta(seconds=int(self.step_time.avg * (steps_left + self.steps_after)))
        fields = [f"eta {eta} (run {eta_run})" + "".join(f" {k} {v:.4e}" for k, v in host_values.items())]
        fields.append(f"time {self.step_time.val:.4f} ({self.step_time.avg:.4f})")
        fields += [f"{name} {last:{metric_format(name)}} ({mean:{metric_format(name)}})"
                   for name, (last, mean) in read.items()]  # fmt: skip
        if self.memory is not None:
            fields.append(f"mem {self.memory():.0f}MB")
        self.logger.info(f"{self.header}[{idx}/{self.num_steps}]\t" + "\t".join(fields))
        scalars = {**host_values, **{name: last for name, (last, _) in read.items()}}
        self.writer.scalars(scalars, self.first_step + idx, prefix="train/")

    def read(self):
        """``{name: (last value, epoch mean)}`` of the meters (one read of the device)."""
        return self.meters.read()


def metric_format(name):
    """Accuracies and shares in percent with 3 decimals, the rest (losses, norms) with 4."""
    return ".3f" if name.endswith("_acc1") or name.startswith("contrast_") or name in SYNCO_METRICS else ".4f"


# SynCo's metrics beside MoBY's contrast_acc1 / contrast_acc5, in this order in the log lines
SYNCO_METRICS = ("contrast_acc1_real", "contrast_acc5_real", "synthetic_above_positive")


def contrastive_metrics(logits, labels, real_columns=None):
    """Per-step metrics of InfoNCE logits [N, C] whose positive is column ``labels`` [N], as
    device tensors (no host synchronisation), in percent.

    contrast_acc1 / contrast_acc5: the positive is among the 1 / 5 largest of all C logits.
    With ``real_columns`` (SynCo: columns 0 .. real_columns - 1 hold the positive and the
    queue, the rest synthetic negatives) also contrast_acc1_real / contrast_acc5_real, the
    same among the positive and the queue only (what MoBY's contrast_acc1 measures), and,
    when there are synthetic columns, synthetic_above_positive: the share of the synthetic
    logits larger than their row's positive.
    """
    acc1, acc5 = accuracy(logits, labels, topk=(1, 5))
    values = {"contrast_acc1": acc1, "contrast_acc5": acc5}
    if real_columns is None:
        return values
    values["contrast_acc1_real"], values["contrast_acc5_real"] = accuracy(logits[:, :real_columns], labels, (1, 5))
    synthetic = logits[:, real_columns:]  # [N, S]
    if synthetic.shape[1]:
        positive = logits.gather(1, labels[:, None])  # [N, 1]
        values["synthetic_above_positive"] = (synthetic > positive).float().mean() * 100
    return values


def count_correct(logits, targets, topk=(1, 5)):
    """Number of samples whose target is among the top-k logits, for each k. [B, C], [B] -> list of ints."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices  # [B, maxk]
    hit = pred == targets[:, None]
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in topk]
