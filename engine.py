"""What the entry scripts share: the command line, joining the processes, the output folder,
precision, seeding, learning-rate scaling, DDP, fault handling, the pretrained encoder of a
run, and frozen features.

An entry script (``main_pretrain.py``, ``main_linear.py``, ``eval_*.py``) reads::

    def setup(argv):   # parse, configure, validate, join the processes, open the output folder
        args = build_parser(...).parse_args(argv)
        ...
    def main(config, env, logger): ...   # build, loop, save
    if __name__ == "__main__":
        run_cli(setup, main)
"""

import argparse
import glob
import json
import logging
import logging.handlers
import multiprocessing
import os
import resource
import signal
import sys
import threading
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from config import NAME_KEYS, ConfigError, get_config, opts_keys
from data.build import derive_seed, dist_rank_world
from logger import create_logger
from models.build import ENCODER_SHAPE_KEYS
from models.convert import convert_original_encoder
from utils import (
    all_ranks,
    group_failure,
    init_distributed,
    mark_group_failed,
    read_checkpoint,
    read_run_checkpoint,
    save_atomic,
    seed_everything,
    world_size,
)

# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def build_parser(prog, description, example, defaults=None, throughput=True):
    """The flags every entry script takes. ``defaults``: the config the flags override before
    ``--cfg`` (config.py's defaults, under a script's own recipe), shown in ``--help``;
    ``example``: a command line shown at the end of ``--help``."""
    defaults = defaults or get_config()

    def default(key):
        node = defaults
        for part in key.split("."):
            node = node[part]
        return f"{key}; default {node!r} unless --cfg or --opts set it"

    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cfg", type=str, required=True, metavar="FILE", help="YAML config file (configs/*.yaml)")
    parser.add_argument(
        "--opts", default=None, nargs="+", metavar="KEY VALUE",
        help="override config keys, e.g. --opts DATA.IMG_SIZE 128 TRAIN.EPOCHS 100",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=int, metavar="N", help=f"images per process ({default('DATA.BATCH_SIZE')})"
    )
    parser.add_argument(
        "--data-path", type=str, metavar="PATH",
        help="dataset folder (DATA.DATA_PATH): ImageNet's has train/ and val/",
    )  # fmt: skip
    parser.add_argument("--zip", action="store_true", help="read train.zip + train_map.txt (DATA.ZIP_MODE)")
    parser.add_argument(
        "--cache-mode", type=str, choices=["no", "full", "part"], help=f"zip cache ({default('DATA.CACHE_MODE')})",
    )  # fmt: skip
    parser.add_argument(
        "--resume", metavar="FILE", help="resume from this checkpoint (default: the run folder's newest)"
    )
    parser.add_argument(
        "--accumulation-steps", type=int, metavar="N",
        help=f"gradient accumulation steps ({default('TRAIN.ACCUMULATION_STEPS')})",
    )  # fmt: skip
    parser.add_argument("--use-checkpoint", action="store_true", help="gradient checkpointing to save memory")
    parser.add_argument(
        "--amp-opt-level", type=str, choices=["O0", "O1", "O2"],
        help="precision: O0 fp32, O1 fp16 autocast with a grad scaler, O2 bf16 autocast (AMP_OPT_LEVEL; "
        "default O0, fp32 on every device, CPUs included; the level used is logged and saved in config.json)",
    )  # fmt: skip
    parser.add_argument(
        "--output", type=str, metavar="PATH",
        help=f"root of the output folders <output>/<MODEL.NAME>/<tag> ({default('OUTPUT')})",
    )  # fmt: skip
    parser.add_argument("--tag", help=f"name of the run under <output>/<MODEL.NAME> ({default('TAG')})")
    if throughput:
        parser.add_argument(
            "--throughput", action="store_true",
            help="measure images/s on synthetic batches of the configured size and exit; "
            "prints the last line 'throughput: <images/s>'",
        )  # fmt: skip
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="unpickle checkpoints in full (can run code): only for files you trust",
    )  # fmt: skip
    # torch.distributed.launch passes --local-rank (or --local_rank); torchrun sets LOCAL_RANK
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    return parser


# -----------------------------------------------------------------------------
# Processes, output folder, precision
# -----------------------------------------------------------------------------


def join_processes(config, local_rank):
    """Join the process group; record the local rank in the config."""
    env = init_distributed(local_rank, config.DIST_TIMEOUT)
    config.defrost()
    config.LOCAL_RANK = env.local_rank
    config.freeze()
    return env


def open_output(config, env, folder, name, notes=(), warnings=()):
    """Create ``folder`` with the per-rank logger, and the resolved config.json on rank 0; log
    ``notes`` (lines about the configuration made before the logger existed) and, on rank 0,
    ``warnings`` (e.g. config.inert_settings) as WARNING lines."""
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
    log_precision(config, env, logger)
    for line in notes:
        logger.info(line)
    for line in warnings if env.is_main else ():
        logger.warning(line)
    return logger


PRECISIONS = {"O0": "fp32", "O1": "fp16 autocast with a grad scaler", "O2": "bf16 autocast"}
AMP_DTYPES = {"O1": torch.float16, "O2": torch.bfloat16}


def amp_autocast(config, device):
    """A context factory: autocast to AMP_OPT_LEVEL's dtype (O1 fp16, O2 bf16), or nothing."""
    return partial(
        torch.autocast,
        device_type=device.type,
        dtype=AMP_DTYPES.get(config.AMP_OPT_LEVEL),
        enabled=config.AMP_OPT_LEVEL in AMP_DTYPES,
    )


def log_precision(config, env, logger):
    """One line: the precision the run computes in (AMP_OPT_LEVEL, as config.json records it)."""
    logger.info(f"precision: AMP_OPT_LEVEL {config.AMP_OPT_LEVEL} ({PRECISIONS[config.AMP_OPT_LEVEL]}) on {env.device}")


# -----------------------------------------------------------------------------
# Training helpers
# -----------------------------------------------------------------------------


def scale_learning_rates(config, world_size):
    """Linear scaling rule: the configured rates are for a global batch of 512."""
    scale = config.DATA.BATCH_SIZE * world_size / 512.0 * max(config.TRAIN.ACCUMULATION_STEPS, 1)
    config.defrost()
    config.TRAIN.BASE_LR *= scale
    config.TRAIN.WARMUP_LR *= scale
    config.TRAIN.MIN_LR *= scale
    config.freeze()


def seed_epoch(config, epoch, rank):
    """Every random stream of an epoch is a pure function of (SEED, epoch, rank), so a
    run resumed at an epoch boundary draws exactly what an uninterrupted one would."""
    seed_everything(int(np.random.SeedSequence([config.SEED, epoch, rank]).generate_state(1)[0]))


def seed_step(config, epoch, step, rank):
    """Every random stream of a step (drop path, SynCo's draws) is a pure function of
    (SEED, epoch, step, rank), so a run resumed inside an epoch draws what an uninterrupted
    one would. Host-side: seeding the CUDA generators does not wait for the device."""
    seed_everything(derive_seed(config.SEED, epoch, step, rank))


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------


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


def memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux


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


# -----------------------------------------------------------------------------
# Faults: one line and exit code 2
# -----------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """The loss, gradients or weights stopped being finite."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota, a lost mount)."""


class ProcessFaultError(RuntimeError):
    """This process cannot go on: another one stalled or died, or a data loader worker died."""


class StopSignal:
    """SIGTERM or SIGUSR1 (a scheduler's notice of preemption) only sets ``requested``: a host
    flag, read where the ranks meet anyway (``sync_ranks``), so all stop after the same step.

    But when another process of the group has already ended with an error (``mark_group_failed``;
    torchrun then stops the others with SIGTERM, to restart the group), the ranks can no longer
    meet: the process ends at once, with one line and exit code 2. A thread watches the signals
    (``signal.set_wakeup_fd``), so this holds while the training thread hangs in a step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for signum in self.SIGNALS:
            signal.signal(signum, lambda signum, frame: None)  # the thread below acts on them
        threading.Thread(target=self._watch, args=(read_end,), name="stop-signal", daemon=True).start()

    def _watch(self, read_end):
        while True:
            signum = os.read(read_end, 1)[0]
            if signum not in self.SIGNALS:  # any other signal with a Python handler (SIGCHLD, SIGINT)
                continue
            self.requested = True
            failure = group_failure()
            if failure is not None:
                print(
                    f"error: rank {dist_rank_world()[0]} stopped by {signal.Signals(signum).name} without saving: "
                    f"another process failed: {failure[:300]}",
                    file=sys.stderr,
                    flush=True,
                )
                end_loader_workers()
                os._exit(2)


def process_fault(error, config, epoch, step):
    """A one-line ProcessFaultError for ``error``, raised at ``step`` of ``epoch``, when it is a fault
    of the processes (rather than of the code), else None."""
    text = " ".join(str(error).split())
    if "DataLoader worker" in text:
        cause = f"a data loader worker died ({text[:160]}): out of host memory? Lower DATA.NUM_WORKERS"
    elif "timed out" in text.lower() or "timeout" in text.lower():
        cause = (
            f"waited more than DIST_TIMEOUT {config.DIST_TIMEOUT} s for the other processes in a collective: "
            "one of them stalled (a hung file system, a stuck worker) or died"
        )
    elif isinstance(error, torch.distributed.DistError) or "Connection closed" in text or "Connection reset" in text:
        cause = f"lost the connection to another process ({text[:160]}): it died or its node failed"
    else:
        return None
    return ProcessFaultError(f"rank {dist_rank_world()[0]} at epoch {epoch} step {step}: {cause}")


def write_checkpoints(state, paths, last_good, logger):
    """Write ``state`` to each of ``paths`` in turn (``save_atomic``); returns the last path.

    A write that fails leaves no file behind and raises CheckpointWriteError naming it, the OS's
    reason and the newest good checkpoint, the one auto-resume then picks.
    """
    for path in paths:
        try:
            save_atomic(state, path)
        except OSError as e:
            raise CheckpointWriteError(
                f"could not write {path} ({e.strerror or e}); the last good checkpoint is {last_good or 'none'}: "
                f"free space in {os.path.dirname(path) or '.'} (or fix it), then resume"
            ) from None
        last_good = path
    logger.info(f"saved {', '.join(paths)}")
    return last_good


def save_checkpoints(state, paths, last_good, env, logger):
    """Rank 0 writes ``state`` to ``paths`` (``write_checkpoints``). Every rank returns the last
    path, or raises CheckpointWriteError when rank 0 could not write (one collective): all stop."""
    error = None
    if env.is_main:
        try:
            write_checkpoints(state, paths, last_good, logger)
        except CheckpointWriteError as e:
            error = e
    if not all_ranks(torch.tensor(error is None, device=env.device)):
        raise error or CheckpointWriteError("rank 0 could not write a checkpoint: see its error line")
    return paths[-1]


def run_cli(setup_fn, main_fn, argv=None):
    """Run ``main_fn(*setup_fn(argv))``; expected failures print one line and exit 2. A process
    that fails tells the others (``mark_group_failed``: see StopSignal)."""
    rank = int(os.environ.get("RANK", 0))
    try:
        try:
            main_fn(*setup_fn(argv))
        except Exception as e:
            text = " ".join(str(e).split()) or type(e).__name__
            mark_group_failed(text if text.startswith(f"rank {rank} ") else f"rank {rank}: {text}")
            raise
    except (ConfigError, FileNotFoundError, PermissionError, NonFiniteLossError, CheckpointWriteError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except ProcessFaultError as e:  # the rank that met it says so
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        end_loader_workers()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def end_loader_workers():
    """Kill this process's data loader workers: they ignore SIGTERM (ignore_stop_signals), which
    an exit would send them."""
    for worker in multiprocessing.active_children():
        worker.kill()


# -----------------------------------------------------------------------------
# Evaluation: the pretrained encoder of a run, and its frozen features
# -----------------------------------------------------------------------------


def load_pretrained_encoder(model, path, encoder_name, ckpt=None, trust=False):
    """Copy the online encoder of a pretraining checkpoint into ``model`` (all but its head);
    returns its pretraining epoch. ``ckpt``: the checkpoint, when already read from ``path``.

    Checkpoints of the original MoBY / SynCo-v2 code are converted (``models/convert.py``).
    Raises ConfigError naming the path and the keys when the checkpoint is missing,
    unreadable, refused (``trust``: see utils.read_checkpoint), from another backbone,
    or has no ``encoder.*`` weights.
    """
    if ckpt is None:
        if not os.path.isfile(path):
            raise ConfigError(
                f"no pretrained checkpoint at {path}: pretrain with the same --cfg, --opts, --output and --tag "
                "first, or set LINEAR_EVAL.PRETRAINED"
            )
        ckpt = read_checkpoint(path, trust)
    found = ckpt.get("framework", {}).get("encoder", encoder_name)
    if found != encoder_name:
        raise ConfigError(f"{path} holds a {found} encoder, but MODEL.ENCODER is {encoder_name}")
    state = ckpt.get("model", ckpt)
    encoder = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    if not encoder:
        raise ConfigError(f"{path} has no encoder.* weights (keys: {', '.join(list(state)[:5])}, ...)")
    encoder = convert_original_encoder(encoder, encoder_name)
    head_params = {id(p) for p in model.get_classifier().parameters()}
    head = {n for n, p in model.named_parameters() if id(p) in head_params}
    encoder = {k: v for k, v in encoder.items() if k not in head}  # a pretraining head is never reused
    own = model.state_dict()
    mismatched = [k for k, v in encoder.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(encoder) - head)
    unexpected = sorted(set(encoder) - set(own))
    if mismatched or missing or unexpected:
        raise ConfigError(
            f"{path} does not match {encoder_name}: mismatched shapes {mismatched[:5]}, "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(encoder, strict=False)
    return ckpt.get("epoch")


def load_run_encoder(model, config, logger):
    """Load into ``model`` the online encoder of LINEAR_EVAL.PRETRAINED (a checkpoint file, or a
    run folder) or else of the run folder OUTPUT: a folder's newest readable checkpoint, as
    auto-resume picks it, or the file inherit_encoder_settings took the settings from (read
    once: rank 0 keeps what it read, the other ranks read the file rank 0 chose). Logs the
    file and epoch; returns the epoch."""
    source = pretrained_source(config)
    held = _READ_FOR_SETTINGS.pop((source, config.TRUST_CHECKPOINT), None)
    if held is None:
        path, ckpt = read_run_checkpoint(source, logger, config.TRUST_CHECKPOINT)
    else:  # the file inherit_encoder_settings chose on rank 0; only rank 0 holds it read
        path, ckpt, skipped = held
        for record in skipped:
            logger.log(record.levelno, record.getMessage())
        if ckpt is None and path is not None:
            ckpt = read_checkpoint(path, config.TRUST_CHECKPOINT)
    if ckpt is None:
        raise missing_checkpoint_error(config)
    epoch = load_pretrained_encoder(model, path, config.MODEL.ENCODER, ckpt)
    logger.info(f"loaded the encoder of {path} (pretraining epoch {epoch})")
    return epoch


def pretrained_source(config):
    """What evaluation reads the encoder from: LINEAR_EVAL.PRETRAINED, else the run folder OUTPUT."""
    return config.LINEAR_EVAL.PRETRAINED or config.OUTPUT


def missing_checkpoint_error(config):
    """The ConfigError for a pretrained checkpoint that is not there; when the run folder was
    expected at OUTPUT (<output>/<MODEL.NAME>/<tag>), it names the run folders with the same
    tag that hold checkpoints, and the named settings they ran with that differ from this config
    (a run pretrained with e.g. --opts MODEL.CONTRAST_NUM_NEGATIVE 64 has that in its name)."""
    source = pretrained_source(config)
    others = ""
    if not config.LINEAR_EVAL.PRETRAINED:
        root = os.path.dirname(os.path.dirname(source))
        runs = [
            folder
            for folder in sorted(glob.glob(os.path.join(glob.escape(root), "*", glob.escape(config.TAG))))
            if folder != source and glob.glob(os.path.join(glob.escape(folder), "*.pth"))
        ]
        described = [f"{folder}{_named_differences(config, folder)}" for folder in runs[:3]]
        if runs:
            more = f" and {len(runs) - 3} more" if len(runs) > 3 else ""
            others = f"; runs with tag {config.TAG!r}: {', '.join(described)}{more}"
    return ConfigError(
        f"no pretrained checkpoint at {source} (a file, or a run folder with checkpoint.pth or ckpt_epoch_E.pth)"
        f"{others}: pretrain first, or evaluate with the --cfg, --opts, --output and --tag of the pretraining, "
        "or set LINEAR_EVAL.PRETRAINED"
    )


def _named_differences(config, folder):
    """`` (pretrained with --opts KEY VALUE ...)``: the settings of MODEL.NAME (NAME_KEYS) in which the
    run ``folder``'s config.json differs from ``config``; empty without a readable config.json."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            theirs = json.load(f)
    except (OSError, ValueError):
        return ""
    differences = []
    for key in NAME_KEYS:
        value = _lookup(theirs, key)
        if value is not None and value != _lookup(config, key):
            differences.append(f"{key} {value}")
    return f" (pretrained with --opts {' '.join(differences)})" if differences else ""


def _lookup(tree, key):
    """The value of the dotted ``key`` in nested dicts (a config), or None."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


# What inherit_encoder_settings read, for load_run_encoder: {(source, trust): (path, checkpoint
# on rank 0 else None, log records of skipped files on rank 0)}. One read of a file that may
# hold a gigabyte, and on every rank the weights of the very file whose settings were taken,
# even while a run saves newer checkpoints into the folder.
_READ_FOR_SETTINGS = {}


def inherit_encoder_settings(config, args, env):
    """Set the settings that shape the encoder (models.build.ENCODER_SHAPE_KEYS: the backbone and
    the image size) to those stored in the config of the checkpoint evaluation reads (``load_run_encoder``'s
    rule); returns the line to log (open_output's ``notes``).

    The checkpoint's values replace those of the defaults and of --cfg (the YAML recalls the run,
    the checkpoint is what ran); one that ``args.opts`` sets to another value is a ConfigError
    naming both. A checkpoint without a stored config (a plain state dict) leaves the config as
    it is; the original code's (nested dicts) is read like ours (a YAML dump); so does a missing one
    (load_run_encoder says so; --throughput needs none). Call after join_processes, before anything
    reads the config: rank 0 reads the checkpoint, the other ranks take what it read, so every
    rank builds the same encoder.
    """
    if config.THROUGHPUT_MODE:
        return []
    held_as = (pretrained_source(config), config.TRUST_CHECKPOINT)
    read = None  # rank 0: (path, stored settings) of the checkpoint, None without one, or the error
    if env.is_main:
        try:
            path, ckpt, skipped = _read_quietly(*held_as)
            _READ_FOR_SETTINGS[held_as] = (path, ckpt, skipped)
            read = None if ckpt is None else (path, _stored_encoder_settings(ckpt))
        except Exception as e:  # the other ranks raise it too
            read = e
    if env.world_size > 1:
        box = [read]
        torch.distributed.broadcast_object_list(box, src=0)
        read = box[0]
    if isinstance(read, Exception):
        raise read
    if read is None:
        return []
    path, stored = read
    if not env.is_main:
        _READ_FOR_SETTINGS[held_as] = (path, None, [])
    current = {key: _lookup(config, key) for key in ENCODER_SHAPE_KEYS}
    settings = ", ".join(f"{key} {value}" for key, value in current.items())
    if stored is None:
        return [f"{path} stores no config: the encoder is built from --cfg and --opts ({settings})"]
    explicit = opts_keys(args)
    changes = {key: value for key, value in stored.items() if value != current[key]}
    for key, value in changes.items():
        if key in explicit:
            raise ConfigError(
                f"--opts {key} {current[key]} contradicts {path}, pretrained with {key} {value}: "
                "drop it from --opts (evaluation takes the checkpoint's), or evaluate another checkpoint"
            )
    if not changes:
        return [f"encoder settings as in the config of {path}: {settings}"]
    config.defrost()
    config.merge_from_list([item for key_value in changes.items() for item in key_value])
    config.freeze()
    taken = ", ".join(f"{key}: {current[key]} -> {value}" for key, value in changes.items())
    return [f"from the config of {path}: {taken} (the checkpoint's settings replace those of --cfg and the defaults)"]


def _read_quietly(source, trust):
    """``read_run_checkpoint(source)`` -> (path, checkpoint, the log records of the files it
    skipped): load_run_encoder logs them, with the evaluation's logger, once it exists."""
    skipped = logging.handlers.BufferingHandler(capacity=1000)
    reader = logging.Logger("engine.settings_read")  # not registered: its records wait in ``skipped``
    reader.addHandler(skipped)
    path, ckpt = read_run_checkpoint(source, reader, trust)
    return path, ckpt, skipped.buffer


def _stored_encoder_settings(ckpt):
    """{key: value} of ENCODER_SHAPE_KEYS in the checkpoint's stored config; None when it stores none."""
    stored = ckpt.get("config") if isinstance(ckpt, dict) else None
    if isinstance(stored, str):  # ours: the yacs dump
        stored = yaml.safe_load(stored)
    if not isinstance(stored, dict):
        return None
    values = {key: _lookup(stored, key) for key in ENCODER_SHAPE_KEYS}
    return {key: value for key, value in values.items() if value is not None} or None


@torch.no_grad()
def extract_features(model, data_loader, num_samples, rank, device, autocast, order=None):
    """Normalised features [num_samples, D] and labels [num_samples] of the whole dataset on
    every rank, from a loader over this rank's samples: ``order``, the dataset index of each
    sample in the order the loader yields them, by default ``rank, rank + world, ...``."""
    model.eval()
    feats, labels = [], []
    for images, targets in data_loader:
        with autocast():
            out = model(images.to(device, non_blocking=True))
        feats.append(F.normalize(out.float(), dim=1))
        labels.append(targets.to(device))
    feats, labels = torch.cat(feats), torch.cat(labels)
    if world_size() == 1 and order is None:
        return feats, labels
    if order is None:
        index = torch.arange(rank, num_samples, world_size(), device=device)
    else:
        index = torch.as_tensor(order, dtype=torch.long, device=device)
    all_feats = feats.new_zeros(num_samples, feats.shape[1])
    all_labels = labels.new_zeros(num_samples)
    all_feats[index], all_labels[index] = feats, labels
    if world_size() > 1:
        torch.distributed.all_reduce(all_feats)
        torch.distributed.all_reduce(all_labels)
    return all_feats, all_labels
