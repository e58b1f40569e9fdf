"""Monitors of a pretraining run: how well the online encoder's features classify, measured
while it trains (solo-learn's online linear classifier, lightly's k-NN callback).

    monitors = Monitors.build(config, env, logger, train_set, model.encoder.num_features)
    ...  # each step, after the optimizer step:
    metric_logger.update(**monitors.train_step(out["features"], targets))
    ...  # after each epoch:
    monitors.end_epoch(epoch, model.encoder, autocast, writer, global_step)

* Online linear: ``OnlineLinear``, a linear classifier on the detached features of both views,
  trained in the same step on the training set's labels with an optimizer of its own (running
  train top-1 ``linear_acc1``); after every epoch its top-1 / top-5 on the val images.
* k-NN: before training, every MONITOR.KNN_EVERY epochs and after the last, the weighted k-NN top-1 / top-5
  (``knn.knn_scores``) of the val images over a bank of centre-cropped training images, at most
  MONITOR.KNN_TRAIN_PER_CLASS of each class; the features of the bank are extracted and kept
  sharded over the processes.

Neither changes the pretraining: no gradient reaches the backbone, the encoder is only read
(in eval mode, which moves no BatchNorm statistic), and torch's random generators are left as
they were, so with the monitors on or off a seed trains the same weights bit for bit.
"""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import accuracy

from data.build import check_split
from data.linear import IMAGENET_DATASETS, build_linear_loaders, canonical_dataset_name, count_classes
from distributed import get_rank, get_world_size
from engine import extract_features, validate
from knn import knn_scores
from utils import derive_seed

# derive_seed(SEED, MONITOR_STREAM): the stream of the linear head's initial weights
MONITOR_STREAM = 0x6D6F6E


class OnlineLinear:
    """A linear classifier trained on detached features with SGD (momentum 0.9, no weight decay,
    constant ``lr``): BatchNorm without affine parameters (which puts the features of any backbone
    on one scale, as MAE's linear probe), then Linear. Several processes average its gradients and
    BatchNorm statistics every step.

    Its initial weights come from ``seed``, not from torch's global generator.
    """

    def __init__(self, num_features, num_classes, lr, env, seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = nn.Sequential(nn.BatchNorm1d(num_features, affine=False), nn.Linear(num_features, num_classes))
        self.head = head.to(env.device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=lr, momentum=0.9)

    def step(self, features, targets):
        """One SGD step on ``features`` [2B, F] (both views, detached, any dtype) and ``targets`` [B];
        returns the running top-1 of its logits, in %, as a device tensor (no synchronisation)."""
        self.head.train()
        targets = targets.repeat(2)  # view 1's rows, then view 2's
        logits = self.head(features.detach().float())  # [2B, C]
        loss = F.cross_entropy(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._average_over_processes()
        self.optimizer.step()
        return accuracy(logits.detach(), targets, topk=(1,))[0]

    def _average_over_processes(self):
        """Average the gradients and the BatchNorm statistics over the processes, in one blocking
        all-reduce (so a stalled peer raises here, like the training step's collectives): every
        process then holds the same classifier."""
        if get_world_size() == 1:
            return
        tensors = [p.grad for p in self.head.parameters()] + [b for b in self.head.buffers() if b.is_floating_point()]
        flat = torch.cat([t.flatten() for t in tensors])
        torch.distributed.all_reduce(flat)
        flat /= get_world_size()
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(part.view_as(t))

    def classifier(self, encoder):
        """``encoder`` followed by the head: images -> logits."""
        return nn.Sequential(encoder, self.head)

    def state_dict(self):
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])


class Monitors:
    """The monitors of one run (see the module docstring); ``build`` decides which run.

    Args:
        linear: an OnlineLinear, or None.
        loaders: (bank loader, val loader, bank size, val size), or None without val images.
        knn_every: epochs between k-NN measurements; 0: none.
    """

    def __init__(self, config, logger, num_classes, linear=None, loaders=None, knn_every=0):
        self.config, self.logger, self.num_classes = config, logger, num_classes
        self.linear, self.loaders, self.knn_every = linear, loaders, knn_every

    @classmethod
    def build(cls, config, env, logger, train_set, num_features):
        """The monitors the run's config and data allow, after one INFO line saying which."""
        m = config.MONITOR
        if not (m.ONLINE_LINEAR or m.KNN_EVERY):
            logger.info("monitors off: MONITOR.ONLINE_LINEAR False and MONITOR.KNN_EVERY 0")
            return cls(config, logger, 0)
        num_classes = training_classes(train_set)
        if num_classes < 2:
            what = "no class folders" if num_classes == 0 else "one class"
            logger.info(
                f"monitors off: the training set has {what} (the monitors classify its images by class; "
                "sort them into DATA_PATH/train/<class>/ folders to have them)"
            )
            return cls(config, logger, 0)
        loaders, no_val = None, val_missing(config)
        if not no_val:
            with torch.random.fork_rng(devices=[]):  # listing the sets draws nothing, but stay sure
                bank, val, bank_loader, val_loader, _ = build_linear_loaders(
                    config, env.rank, env.world_size, for_features=True,
                    bank_per_class=m.KNN_TRAIN_PER_CLASS if m.KNN_EVERY else 1, persistent=False,
                )  # fmt: skip
            loaders = (bank_loader, val_loader, len(bank), len(val))
        linear = None
        if m.ONLINE_LINEAR:
            seed = derive_seed(config.SEED, MONITOR_STREAM)
            linear = OnlineLinear(num_features, num_classes, m.LINEAR_LR, env, seed)
        knn_every = m.KNN_EVERY if loaders else 0
        parts = [f"online linear {'on' if linear else 'off'}", f"k-NN every {knn_every} epochs" if knn_every else
                 "k-NN off"]  # fmt: skip
        if loaders:
            sizes = f"bank {loaders[2]} images, " if knn_every else ""
            parts.append(f"{sizes}val {loaders[3]} images")
        else:
            parts.append(f"no val images ({no_val}): no val top-1, no k-NN")
        logger.info(f"monitors: {num_classes} classes; " + ", ".join(parts))
        return cls(config, logger, num_classes, linear, loaders, knn_every)

    @property
    def enabled(self):
        return self.linear is not None or self.knn_every > 0

    def train_step(self, features, targets):
        """The online linear step on this step's ``features`` [2B, F]: ``{"linear_acc1": tensor}``, or {}."""
        if self.linear is None:
            return {}
        return {"linear_acc1": self.linear.step(features, targets)}

    def knn_due(self, epoch):
        return self.knn_every > 0 and ((epoch + 1) % self.knn_every == 0 or epoch + 1 == self.config.TRAIN.EPOCHS)

    @torch.no_grad()
    def end_epoch(self, epoch, encoder, autocast, writer, global_step):
        """After ``epoch``: the online linear classifier's val top-1 / top-5 and, when due, the k-NN's;
        one log line each, TensorBoard scalars ``monitor/*`` at ``global_step``. {name: value}."""
        if self.loaders is None:
            return {}
        _, val_loader, _, num_val = self.loaders
        device, values = next(encoder.parameters()).device, {}
        with torch.random.fork_rng(devices=[]):
            if self.linear is not None:
                top1, top5, _ = validate(self.linear.classifier(encoder), val_loader, device, autocast)
                values.update(linear_val_acc1=top1, linear_val_acc5=top5)
                self.logger.info(
                    f"EPOCH {epoch} online linear val ({num_val} images): top-1 {top1:.2f}% top-5 {top5:.2f}%"
                )
            if self.knn_due(epoch):
                values.update(self._knn(epoch, encoder, autocast))
        writer.scalars(values, global_step, prefix="monitor/")
        return values

    @torch.no_grad()
    def before_training(self, encoder, autocast, writer):
        """The k-NN of the initial encoder (when the k-NN monitor is on), logged as ``EPOCH -1
        (before training)`` and at global step 0: the baseline a learning run leaves behind."""
        if self.knn_every:
            with torch.random.fork_rng(devices=[]):
                writer.scalars(self._knn(-1, encoder, autocast), 0, prefix="monitor/")

    def _knn(self, epoch, encoder, autocast):
        """{knn_acc1, knn_acc5} of ``encoder`` after ``epoch``, and one log line."""
        bank_loader, val_loader, num_bank, num_val = self.loaders
        device, start = next(encoder.parameters()).device, time.time()
        k, temperature = self.config.MONITOR.KNN_K, self.config.MONITOR.KNN_TEMPERATURE
        bank_feats, bank_labels, _ = extract_features(
            encoder, bank_loader, num_bank, get_rank(), device, autocast, gather=False
        )
        val_feats, val_labels = extract_features(encoder, val_loader, num_val, get_rank(), device, autocast)
        c1, c5 = knn_scores(bank_feats, bank_labels, val_feats, val_labels, [k], self.num_classes, temperature)[k]
        values = {"knn_acc1": 100 * c1 / num_val, "knn_acc5": 100 * c5 / num_val}
        when = f"EPOCH {epoch}" + (" (before training)" if epoch < 0 else "")
        self.logger.info(
            f"{when} k-NN val (k={k}, T={temperature}, bank {num_bank} images, {num_val} val): "
            f"top-1 {values['knn_acc1']:.2f}% top-5 {values['knn_acc5']:.2f}% in {time.time() - start:.1f}s"
        )
        return values

    def state_dict(self):
        """What resumes the monitors exactly (the online linear classifier and its optimizer), or None."""
        return None if self.linear is None else {"linear": self.linear.state_dict()}

    def load_state_dict(self, state):
        """Continue from ``state_dict()``'s; a checkpoint without it (monitor off when it was saved)
        leaves the classifier as initialised, with one line."""
        if self.linear is None:
            return
        if not state or "linear" not in state:
            self.logger.info("the checkpoint holds no online linear classifier: it starts afresh")
            return
        self.linear.load_state_dict(state["linear"])


def training_classes(train_set):
    """Number of classes of the training set: 0 without labels (``UnlabelledImageFolder``)."""
    try:
        return count_classes(train_set, train_set)
    except (ValueError, TypeError):  # no class list that agrees with the labels, or no labels
        return 0


def val_missing(config):
    """Why there are no val images for the monitors (a one-line reason), or '' when there are."""
    if canonical_dataset_name(config.DATA.DATASET) not in IMAGENET_DATASETS:
        return ""  # a transfer set: its test split
    try:
        check_split(config, "val")
    except FileNotFoundError:
        return f"no {'val.zip' if config.DATA.ZIP_MODE else 'val/'} under {config.DATA.DATA_PATH}"
    return ""
