"""Small helpers of every run: seeds, the learning-rate scaling rule, memory figures."""

import random
import resource

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*values: int) -> int:
    """A 64-bit seed mixing integers, so nearby tuples give unrelated streams."""
    h = len(values)
    for value in values:
        h = _splitmix64(h ^ (int(value) & _MASK64))
    return h


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(config, epoch, rank):
    """Every random stream of an epoch is a pure function of (SEED, epoch, rank), so a
    run resumed at an epoch boundary draws exactly what an uninterrupted one would."""
    seed_everything(int(np.random.SeedSequence([config.SEED, epoch, rank]).generate_state(1)[0]))


def seed_step(config, epoch, step, rank):
    """Every random stream of a step (drop path, SynCo's draws) is a pure function of
    (SEED, epoch, step, rank), so a run resumed inside an epoch draws what an uninterrupted
    one would. Host-side: seeding the CUDA generators does not wait for the device."""
    seed_everything(derive_seed(config.SEED, epoch, step, rank))


def lr_scale(batch_size, world_size, accumulation_steps):
    """The linear scaling rule's factor: the configured rates are for a global batch of 512."""
    return batch_size * world_size / 512.0 * max(accumulation_steps, 1)


def scale_learning_rates(config, world_size):
    """Scale TRAIN.BASE_LR, WARMUP_LR and MIN_LR by ``lr_scale`` of this run's global batch."""
    scale = lr_scale(config.DATA.BATCH_SIZE, world_size, config.TRAIN.ACCUMULATION_STEPS)
    config.defrost()
    config.TRAIN.BASE_LR *= scale
    config.TRAIN.WARMUP_LR *= scale
    config.TRAIN.MIN_LR *= scale
    config.freeze()


def memory_mb(device):
    """Peak memory of this process in MiB: allocated on a CUDA ``device``, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
