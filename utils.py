"""Distributed set-up and collectives, seeding, and checkpoints."""

import contextlib
import datetime
import glob
import hashlib
import os
import pickle
import random
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from config import ConfigError

# -----------------------------------------------------------------------------
# Distributed
# -----------------------------------------------------------------------------


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def launcher_env(local_rank=None):
    """(rank, world_size, local_rank) as set by torchrun / torch.distributed.launch or
    SLURM; (0, 1, 0) for a plain ``python`` run. ``local_rank`` is the launcher's
    ``--local-rank`` flag when it passed one."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", local_rank if local_rank is not None else 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
    else:
        rank, world, local = 0, 1, 0
    return rank, world, local


def init_distributed(local_rank=None, timeout_s=None):
    """Join the process group (NCCL on CUDA, gloo on the CPU) when launched with
    several processes, and pick this process's device.

    ``timeout_s``: how long a collective may wait for the other ranks before it raises
    (PyTorch's default without it); on NCCL, asynchronous error handling tears the
    process down when a collective times out, as torchrun sets it by default.
    """
    global _group_store
    rank, world, local = launcher_env(local_rank)
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        _group_store = group_store(rank, world, timeout)
        dist.init_process_group(
            backend,
            store=_group_store,
            rank=rank,
            world_size=world,
            device_id=device if backend == "nccl" else None,
            timeout=timeout,
        )
    return DistEnv(rank, world, local, device)


_group_store = None  # the store of this process's group (init_distributed)


def group_store(rank, world, timeout=None):
    """The key-value store through which the processes join their group, at MASTER_ADDR:MASTER_PORT.

    Under torchrun it is its agent's (TORCHELASTIC_USE_AGENT_STORE): it outlives the processes and
    serves every attempt of ``--max-restarts``, so its keys are scoped by the attempt
    (TORCHELASTIC_RESTART_COUNT). Unscoped, a restarted process reads the addresses the previous
    attempt's processes left there, and gloo fails ("Connection refused", "Connect timeout") or
    waits; NCCL reads their stale unique id. Otherwise rank 0 hosts it, as ``env://`` would.
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0 and not agent,
        timeout=timeout or datetime.timedelta(minutes=30),
        multi_tenant=True,
    )
    if agent:
        store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    return store


def mark_group_failed(reason):
    """Record in the group's store that this process ends with an error (``reason``), for the
    others (``group_failure``); nothing in a single process, nor when the store is gone."""
    if _group_store is not None:
        with contextlib.suppress(Exception):
            _group_store.set("failed", reason)


def group_failure():
    """Why another process of the group ended (``mark_group_failed``): a text, or None while none
    did. A store that cannot be reached (rank 0 hosted it and is gone) counts as a failure."""
    if _group_store is None:
        return None
    try:
        return _group_store.get("failed").decode() if _group_store.check(["failed"]) else None
    except Exception as e:
        return f"the group's store is unreachable ({' '.join(str(e).split())[:120]})"


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def all_gather_cat(x):
    """Concatenate ``x`` [N, ...] of every rank along dim 0, in rank order (no gradient)."""
    if world_size() == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(gathered, x.contiguous())
    return torch.cat(gathered)


def all_reduce_mean(x):
    """Mean of the tensor ``x`` over all ranks."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


def all_ranks(flag):
    """True when the boolean tensor ``flag`` is true on every rank."""
    flag = flag.detach().to(torch.int32).reshape(1)
    if world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# Checkpoints
# -----------------------------------------------------------------------------


def rng_state():
    """Every random generator a run draws from, so a resume continues the same streams."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _KeepOSError:
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
    ``load_newest_checkpoint`` of the folder.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _KeepOSError(f)
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
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest, obj):
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        digest.update(f"dict {len(obj)};".encode())
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{type(obj).__name__} {len(obj)};".encode())
        for value in obj:
            _feed(digest, value)
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


def load_newest_checkpoint(output_dir, logger, trust=False):
    """``newest_checkpoint`` of a folder this process alone writes to, after deleting the
    temporary files of its interrupted saves."""
    remove_stale_tmp(output_dir, logger)
    return newest_checkpoint(output_dir, logger, trust)


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
