"""Checkpoints: written atomically with a digest, read safely, found, resumed from.

    path, ckpt = newest_checkpoint(folder, logger)            # the rule every resume and evaluation reads by
    start_epoch, start_step, path, ckpt = resume_point(config, env, logger, folder)
    restore(path, ckpt, model=model, optimizer=optimizer, scaler=scaler)
    checkpointer = Checkpointer(env, logger, last_good=path); checkpointer.save(state, [path, ...])

``resume_point`` and ``restore`` are the one resume path of pretraining and linear evaluation.
"""

import contextlib
import glob
import hashlib
import math
import os
import pickle
import re
import shutil
from collections import OrderedDict

import torch
import yaml

from config import ConfigError
from distributed import all_ranks, unwrap
from utils import lr_scale


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota, a lost mount)."""


# -----------------------------------------------------------------------------
# Writing
# -----------------------------------------------------------------------------


class _OSErrorKeepingFile:
    """A binary file's ``write`` that keeps the OSError it raised: torch.save turns a failed
    write into a RuntimeError without the OS's reason ("unexpected pos ...")."""

    def __init__(self, file):
        self.file = file
        self.error = None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.file.flush()


def _write_atomic(path, write):
    """Call ``write(f)`` on a temporary file, fsync it, then rename it to ``path``: a crash
    never leaves a torn ``path``.

    A failed write removes its temporary file and raises the OSError that failed it (ENOSPC
    on a full disk, EDQUOT, EIO ...); one left by a killed process is removed by the next
    ``resume_point`` in the folder.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _OSErrorKeepingFile(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if writer is not None and writer.error is not None:
            raise writer.error from None
        raise


# A checkpoint's key holding the SHA-256 of the rest of its content (``content_digest``)
DIGEST_KEY = "sha256"


def content_digest(obj):
    """SHA-256 of a checkpoint's content: each tensor's dtype, shape and bytes and every value
    around them, in order. Equal before saving and after loading unless a byte changed."""
    digest = hashlib.sha256()
    _digest_into(digest, obj)
    return digest.hexdigest()


def _digest_into(digest, obj):
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        digest.update(f"dict {len(obj)};".encode())
        for key, value in obj.items():
            _digest_into(digest, key)
            _digest_into(digest, value)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{type(obj).__name__} {len(obj)};".encode())
        for value in obj:
            _digest_into(digest, value)
    else:
        digest.update(f"{type(obj).__name__} {obj!r};".encode())


def save_atomic(obj, path):
    """torch.save ``obj`` to ``path`` through a temporary file and a rename (``_write_atomic``);
    a dict gets its ``content_digest`` under DIGEST_KEY, which read_checkpoint verifies."""
    if isinstance(obj, dict):
        obj = {**obj, DIGEST_KEY: content_digest(obj)}
    _write_atomic(path, lambda f: torch.save(obj, f))


def copy_atomic(src, path):
    """Copy the bytes of ``src`` to ``path`` as every save writes (``_write_atomic``)."""
    with open(src, "rb") as source:
        _write_atomic(path, lambda f: shutil.copyfileobj(source, f, 16 * 2**20))


# -----------------------------------------------------------------------------
# Reading and finding
# -----------------------------------------------------------------------------


def _epoch_of(path):
    match = re.search(r"ckpt_epoch_(\d+)\.pth$", path)
    return int(match.group(1)) if match else -1


# Beyond tensors and plain containers (torch's weights_only set), checkpoints of this
# project pickle nothing; the original code's hold its yacs config, read here as nested
# OrderedDicts: its keys and values, without constructing a CfgNode.
CHECKPOINT_GLOBALS = [(OrderedDict, "yacs.config.CfgNode")]


class UnsafeCheckpointError(ConfigError):
    """A checkpoint that pickles an object whose unpickling could run code."""


def read_checkpoint(path, trust=False):
    """A checkpoint, on the CPU, unpickling only tensors, plain containers and CHECKPOINT_GLOBALS.

    A file that needs any other class or function raises UnsafeCheckpointError naming it
    (nothing of it is run); ``trust=True`` (``--trust-checkpoint``) unpickles it in full.
    A truncated or corrupt file, or one whose content no longer matches the digest it was
    saved with (files without one, like the original code's, are not checked), raises
    ConfigError naming it.
    """
    ckpt = _unpickle_checkpoint(path, trust)
    if isinstance(ckpt, dict) and DIGEST_KEY in ckpt:
        content = {key: value for key, value in ckpt.items() if key != DIGEST_KEY}
        if content_digest(content) != ckpt[DIGEST_KEY]:
            raise ConfigError(
                f"corrupt checkpoint {path}: its content does not match the SHA-256 digest it was saved with "
                "(changed on disk or in a copy since)"
            )
    return ckpt


def _unpickle_checkpoint(path, trust):
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path) or re.findall(r"GLOBAL ([\w.]+)", str(e))[:1]  # legacy format
        if unsafe:
            raise UnsafeCheckpointError(
                f"refused to load {path}: it pickles {', '.join(unsafe)}, which no checkpoint of this project "
                "or of the original code holds, and unpickling it could run code; pass --trust-checkpoint "
                "only if you trust the file"
            ) from None
        raise ConfigError(f"unreadable checkpoint {path} ({type(e).__name__}: {' '.join(str(e).split())})") from None
    except Exception as e:
        raise ConfigError(f"unreadable checkpoint {path} ({type(e).__name__}: {e})") from None


def _unsafe_globals(path):
    """The classes and functions a (zip-format) checkpoint's pickle names beyond what
    read_checkpoint allows (read from the pickle's opcodes, nothing executed); [] if unreadable."""
    allowed = {name for _, name in CHECKPOINT_GLOBALS}
    try:
        return sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed)
    except Exception:
        return []


def _try_load(path, logger, trust):
    try:
        return read_checkpoint(path, trust)
    except UnsafeCheckpointError:
        raise  # not a torn file: never resume past it
    except ConfigError as e:
        logger.warning(f"skipping {e}")
        return None


def remove_stale_tmp(output_dir, logger):
    """Delete the ``*.pth.tmp.<pid>`` files that ``save_atomic`` calls killed mid-write left."""
    for path in glob.glob(os.path.join(glob.escape(output_dir), "*.pth.tmp.*")):
        with contextlib.suppress(FileNotFoundError):  # every rank sweeps the same folder
            os.remove(path)
            logger.info(f"removed {path}, left by an interrupted save")


LATEST = "checkpoint.pth"  # a run's checkpoint of its last finished epoch, rewritten every epoch


def newest_checkpoint(output_dir, logger, trust=False):
    """(path, checkpoint) of the newest readable checkpoint in ``output_dir``, or (None, None).

    The one rule by which auto-resume and every evaluation find a run's weights. A save
    writes ``ckpt_epoch_{E}.pth`` (when due) before ``checkpoint.pth``, so a numbered
    file may be one epoch newer than ``checkpoint.pth``; numbered files are only read
    when their epoch is newer. An unreadable file is skipped with a warning, so a file
    torn by a crash never stops a resume while an older good one exists; one that
    read_checkpoint refuses (``trust``: see there) stops it. Nothing is written or
    deleted: a run may be saving into the folder meanwhile.
    """
    latest_path = os.path.join(output_dir, LATEST)
    latest = _try_load(latest_path, logger, trust) if os.path.isfile(latest_path) else None
    latest_epoch = latest.get("epoch", -1) if latest is not None else -1
    numbered = sorted(glob.glob(os.path.join(glob.escape(output_dir), "ckpt_epoch_*.pth")), key=_epoch_of, reverse=True)
    for path in numbered:
        if _epoch_of(path) <= latest_epoch:
            break
        ckpt = _try_load(path, logger, trust)
        if ckpt is not None:
            return path, ckpt
    return (latest_path, latest) if latest is not None else (None, None)


def make_latest(path, epoch, output_dir, logger):
    """Make ``output_dir``'s ``checkpoint.pth`` a copy of ``path`` (its newest checkpoint,
    of ``epoch``) when it is another file: a process killed between the two files of a
    save left ``checkpoint.pth`` an epoch behind, or without it."""
    latest = os.path.join(output_dir, LATEST)
    if os.path.abspath(path) == os.path.abspath(latest):
        return
    copy_atomic(path, latest)
    logger.info(f"{latest} was behind {path} (epoch {epoch}): replaced by a copy of it")


def read_run_checkpoint(source, logger, trust=False):
    """(path, checkpoint) of ``source``, a checkpoint file read as it is or a run folder read
    by ``newest_checkpoint``; (None, None) when there is no such file or no readable
    checkpoint in the folder. Reads only: a run may be saving into the folder meanwhile."""
    if os.path.isdir(source):
        return newest_checkpoint(source, logger, trust)
    if not os.path.isfile(source):
        return None, None
    return source, read_checkpoint(source, trust)


# -----------------------------------------------------------------------------
# Saving during a run, and resuming
# -----------------------------------------------------------------------------


def _write_error(path, error, last_good):
    return CheckpointWriteError(
        f"could not write {path} ({error.strerror or error}); the last good checkpoint is {last_good or 'none'}: "
        f"free space in {os.path.dirname(path) or '.'} (or fix it), then resume"
    )


class Checkpointer:
    """Rank 0 writes a run's checkpoints; every rank knows the last good one (``last_good``)."""

    def __init__(self, env, logger, last_good=None):
        self.env, self.logger, self.last_good = env, logger, last_good

    def save(self, state, paths):
        """Rank 0 writes ``state`` to each of ``paths`` in turn (``save_atomic``), every rank then
        takes the last one as ``last_good``. A write that fails leaves no file behind, and every
        rank raises CheckpointWriteError naming the file, the OS's reason and the newest good
        checkpoint, the one auto-resume then picks (one collective: all stop)."""
        error = None
        if self.env.is_main:
            last_good = self.last_good
            for path in paths:
                try:
                    save_atomic(state, path)
                except OSError as e:
                    error = _write_error(path, e, last_good)
                    break
                last_good = path
            else:
                self.logger.info(f"saved {', '.join(paths)}")
        if not all_ranks(torch.tensor(error is None, device=self.env.device)):
            raise error or CheckpointWriteError("rank 0 could not write a checkpoint: see its error line")
        self.last_good = paths[-1]


def lookup(tree, key):
    """The value of the dotted ``key`` in nested dicts (a config), or None."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def stored_config(ckpt):
    """The config stored in a checkpoint as nested dicts (ours: a YAML dump; the original code's: its
    CfgNode, read back as dicts); None without one."""
    stored = ckpt.get("config") if isinstance(ckpt, dict) else None
    if isinstance(stored, str):
        stored = yaml.safe_load(stored)
    return stored if isinstance(stored, dict) else None


# What a resumed run must share with its checkpoint: its model, data, batch and schedule
RESUME_KEYS = (
    "MODEL.TYPE", "MODEL.ENCODER", "DATA.DATASET", "DATA.IMG_SIZE", "DATA.BATCH_SIZE", "TRAIN.ACCUMULATION_STEPS",
    "TRAIN.EPOCHS", "TRAIN.WARMUP_EPOCHS", "TRAIN.WEIGHT_DECAY", "TRAIN.OPTIMIZER.NAME", "TRAIN.LR_SCHEDULER.NAME",
    "LINEAR_EVAL.WEIGHTS", "MODEL.SYNTHETIC_START_EPOCH", "MODEL.SYNTHETIC_END_EPOCH",
)  # fmt: skip
# ... and its learning rates, per 512 images (the config holds them scaled by the global batch, which
# may change with the number of processes)
RESUME_RATE_KEYS = ("TRAIN.BASE_LR", "TRAIN.WARMUP_LR", "TRAIN.MIN_LR")


def changed_settings(config, ckpt, world_size):
    """{key: (the checkpoint's value, this config's)} of the RESUME_KEYS and RESUME_RATE_KEYS that
    differ, the rates per 512 images (``world_size``: this run's; a checkpoint that does not record
    its own is not compared on them); {} for a checkpoint without a stored config."""
    stored = stored_config(ckpt) or {}
    changes = {key: (lookup(stored, key), lookup(config, key)) for key in RESUME_KEYS}
    changes = {key: (old, new) for key, (old, new) in changes.items() if old is not None and old != new}
    if "world_size" in ckpt and None not in (lookup(stored, "DATA.BATCH_SIZE"), lookup(stored, "TRAIN.BASE_LR")):
        old_scale = lr_scale(lookup(stored, "DATA.BATCH_SIZE"), ckpt["world_size"],
                             lookup(stored, "TRAIN.ACCUMULATION_STEPS") or 1)  # fmt: skip
        new_scale = lr_scale(config.DATA.BATCH_SIZE, world_size, config.TRAIN.ACCUMULATION_STEPS)
        for key in RESUME_RATE_KEYS:
            old, new = lookup(stored, key) / old_scale, lookup(config, key) / new_scale
            if not math.isclose(old, new, rel_tol=1e-9, abs_tol=1e-15):
                changes[key] = (float(f"{old:.6g}"), float(f"{new:.6g}"))
    return changes


def resume_point(config, env, logger, output_dir):
    """(first epoch to train, first step of it, path, checkpoint) a run in ``output_dir`` continues
    from: ``--resume`` (MODEL.RESUME), else with TRAIN.AUTO_RESUME the folder's newest readable
    checkpoint; (TRAIN.START_EPOCH, 0, None, None) when it starts afresh.

    Before anything else, rank 0 deletes the temporary files of interrupted saves and makes the
    folder's ``checkpoint.pth`` a copy of its newest readable checkpoint (``newest_checkpoint``: the
    rule auto-resume and every evaluation read by), which a run killed between the two files of a
    save left behind. A start at an epoch not newer than that checkpoint (``--resume`` of an older
    file, or TRAIN.AUTO_RESUME False) is refused: the folder would name that checkpoint, not this
    run's, as its newest until this run caught up. A checkpoint of another framework or encoder
    (its ``framework`` entry) is refused too, and so is one whose RESUME_KEYS differ from the
    config's (a finished run started again with another schedule would overwrite what it saved)
    unless ACCEPT_CHANGES (``--accept-changes``).
    """
    trust = config.TRUST_CHECKPOINT
    if config.MODEL.RESUME and not os.path.isfile(config.MODEL.RESUME):
        raise ConfigError(f"--resume {config.MODEL.RESUME}: no such file")
    # read first: the repair below may replace the file when it is the folder's checkpoint.pth
    resumed = read_checkpoint(config.MODEL.RESUME, trust) if config.MODEL.RESUME else None
    newest_path, newest = None, None
    if env.is_main:  # the only writer here: no other rank may delete its temporary files
        remove_stale_tmp(output_dir, logger)
        newest_path, newest = newest_checkpoint(output_dir, logger, trust)
        if newest is not None:
            try:
                make_latest(newest_path, newest["epoch"], output_dir, logger)
            except OSError as e:
                raise _write_error(os.path.join(output_dir, LATEST), e, newest_path) from None
    if env.world_size > 1:
        torch.distributed.barrier()  # the other ranks read the folder as rank 0 left it
        if not env.is_main:
            newest_path, newest = newest_checkpoint(output_dir, logger, trust)

    if config.MODEL.RESUME:
        path, ckpt = config.MODEL.RESUME, resumed
    elif config.TRAIN.AUTO_RESUME:
        path, ckpt = newest_path, newest
        if ckpt is None:
            logger.info(f"no checkpoint in {output_dir}: training from scratch")
    else:
        path, ckpt = None, None

    if ckpt is not None and "framework" in ckpt:
        expected = {"type": config.MODEL.TYPE, "encoder": config.MODEL.ENCODER}
        found = ckpt["framework"]
        if found != expected:
            raise ConfigError(
                f"{path} was written by {found['type']} / {found['encoder']}, but the config asks for "
                f"{expected['type']} / {expected['encoder']}: pick the matching --cfg or another --output/--tag"
            )
    if ckpt is not None and not config.ACCEPT_CHANGES and not config.EVAL_MODE:
        changes = changed_settings(config, ckpt, env.world_size)
        if changes:
            was = " ".join(f"{key} {old}" for key, (old, _) in changes.items())
            now = ", ".join(f"{key} {new}" for key, (_, new) in changes.items())
            raise ConfigError(
                f"{path} was trained with {was}, but this run asks for {now}: run it with its own settings "
                f"(--opts {was}), start another run with another --tag, or pass --accept-changes to continue it "
                "with the new ones"
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
            f"{output_dir}"
        )
    return start_epoch, start_step, path, ckpt


def restore(path, ckpt, model, **objects):
    """Load the states of the checkpoint ``ckpt`` read from ``path`` into ``model`` (unwrapped
    from DDP) and each of ``objects`` (optimizer=..., scaler=...: ``ckpt[name]``). A model state
    that does not fit is a one-line ConfigError.

    The learning-rate schedule is a pure function of the step and the config: its saved state is
    for inspection, so a resume may change e.g. TRAIN.EPOCHS or TRAIN.BASE_LR.
    """
    try:
        unwrap(model).load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as e:
        details = " ".join(str(e).split())[:500]
        raise ConfigError(f"{path} does not fit this model ({details}): check the config it was written with") from None
    for name, obj in objects.items():
        obj.load_state_dict(ckpt[name])
