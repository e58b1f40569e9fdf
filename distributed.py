"""The processes of a run: launching, joining the group, rank and world size, collectives, DDP.

    env = join_processes(config, args.local_rank)   # DistEnv(rank, world_size, local_rank, device, store)
    model = distribute(model, env)                  # DDP (and SyncBatchNorm on CUDA) when world_size > 1

A run is launched by torchrun, ``python -m torch.distributed.launch``, SLURM's ``srun`` or as a
plain ``python`` process (one process, no group). ``get_rank()`` and ``get_world_size()`` are
the one way to ask for this process's place in the group from anywhere.
"""

import contextlib
import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from config import ConfigError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    store: dist.Store | None = None  # the group's key-value store (group_store); None in one process

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


def pick_device(local_rank, cuda=torch.cuda):
    """This process's device: GPU ``local_rank`` of its node, or the only GPU it sees where the
    scheduler gives each task one (SLURM's ``--gpus-per-task=1``: every task sees its GPU as
    cuda:0); the CPU without CUDA. ``cuda``: ``torch.cuda`` (a test may pass another)."""
    if not cuda.is_available():
        return torch.device("cpu")
    count = cuda.device_count()
    if local_rank < count:
        return torch.device("cuda", local_rank)
    if count == 1:
        return torch.device("cuda", 0)
    raise ConfigError(
        f"local rank {local_rank} but this process sees {count} GPUs: start one process per GPU "
        "(--nproc_per_node, --ntasks-per-node) or give each process one GPU (--gpus-per-task=1)"
    )


def init_distributed(local_rank=None, timeout_s=None):
    """Join the process group (NCCL on CUDA, gloo on the CPU) when launched with
    several processes, and pick this process's device.

    ``timeout_s``: how long a collective may wait for the other ranks (PyTorch's default
    without it): then gloo raises in the calling thread, while NCCL's watchdog, with the
    asynchronous error handling set here as torchrun sets it, aborts the process (SIGABRT).
    """
    rank, world, local = launcher_env(local_rank)
    device = pick_device(local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = None
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        store = group_store(rank, world, timeout)
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world,
            device_id=device if backend == "nccl" else None,
            timeout=timeout,
        )
    return DistEnv(rank, world, local, device, store)


def join_processes(config, local_rank):
    """``init_distributed`` with the config's DIST_TIMEOUT; records the local rank in the config."""
    env = init_distributed(local_rank, config.DIST_TIMEOUT)
    config.defrost()
    config.LOCAL_RANK = env.local_rank
    config.freeze()
    return env


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


def mark_group_failed(store, reason):
    """Record in the group's ``store`` that this process ends with an error (``reason``), for the
    others (``group_failure``); nothing without a store (one process) or when it is gone."""
    if store is not None:
        with contextlib.suppress(Exception):
            store.set("failed", reason)


def group_failure(store):
    """Why another process of the group ended (``mark_group_failed``): a text, or None while none
    did. A store that cannot be reached (rank 0 hosted it and is gone) counts as a failure."""
    if store is None:
        return None
    try:
        return store.get("failed").decode() if store.check(["failed"]) else None
    except Exception as e:
        return f"the group's store is unreachable ({' '.join(str(e).split())[:120]})"


def get_rank():
    """This process's rank in the default group; 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    """The number of processes in the default group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# -----------------------------------------------------------------------------
# Collectives
# -----------------------------------------------------------------------------


@torch.no_grad()
def all_gather_cat(x):
    """Concatenate ``x`` [N, ...] of every rank along dim 0, in rank order (no gradient)."""
    if get_world_size() == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(gathered, x.contiguous())
    return torch.cat(gathered)


@torch.no_grad()
def gather_rows_to_main(rows, index, num_rows, block_bytes=2**27):
    """The rows every rank holds (``rows`` [n, ...], row i at ``index[i]`` of the whole), as one
    CPU tensor [num_rows, ...] on rank 0; None on the others. They travel in blocks of at most
    ``block_bytes`` per rank, so a device never holds more than world x block_bytes beyond its own
    rows: the whole is assembled in host memory only."""
    local = torch.tensor([rows.shape[0]], device=rows.device)
    if get_world_size() > 1:
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
    most = int(local.item())  # the largest share: every rank runs as many blocks
    block = max(block_bytes // max(math.prod(rows.shape[1:]) * rows.element_size(), 1), 1)
    out = torch.zeros((num_rows, *rows.shape[1:]), dtype=rows.dtype) if get_rank() == 0 else None
    for start in range(0, most, block):
        size = min(block, most - start)
        part, where = rows[start : start + size], index[start : start + size]
        pad = size - part.shape[0]  # a shorter share
        part = torch.cat([part, part.new_zeros((pad, *rows.shape[1:]))])
        where = torch.cat([where, where.new_full((pad,), -1)])
        part, where = all_gather_cat(part), all_gather_cat(where)
        if out is not None:
            kept = where >= 0
            out[where[kept].cpu()] = part[kept].cpu()
    return out


def all_reduce_mean(x):
    """Mean of the tensor ``x`` over all ranks."""
    if get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / get_world_size()


def all_ranks(flag):
    """True when the boolean tensor ``flag`` is true on every rank."""
    flag = flag.detach().to(torch.int32).reshape(1)
    if get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def broadcast_object(obj, env):
    """Rank 0's ``obj`` on every rank (a picklable object)."""
    if env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -----------------------------------------------------------------------------
# DistributedDataParallel
# -----------------------------------------------------------------------------


def unwrap(model):
    """The module inside DistributedDataParallel, or ``model`` itself."""
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
    device_ids = [env.device.index] if cuda else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)
