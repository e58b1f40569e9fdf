"""Per-step learning-rate schedules: linear warmup, then cosine, linear or step decay.

The schedules are timm's, driven by the global step (``step_update(t)``), so the
learning rate at any point of a resumed run depends on nothing but the step.
"""

from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler


def build_scheduler(config, optimizer, steps_per_epoch):
    """Schedule over TRAIN.EPOCHS * steps_per_epoch steps, the first
    TRAIN.WARMUP_EPOCHS * steps_per_epoch of them a linear warmup from TRAIN.WARMUP_LR."""
    warmup_steps = int(config.TRAIN.WARMUP_EPOCHS * steps_per_epoch)
    # at least 2: a run whose warm-up leaves it 1 step or none (config.inert_settings warns) runs
    # the same learning rates either way, and timm warns obscurely about a 1-step cosine
    decay_steps = max(int(config.TRAIN.EPOCHS * steps_per_epoch) - warmup_steps, 2)
    common = dict(
        warmup_t=warmup_steps,
        warmup_lr_init=config.TRAIN.WARMUP_LR,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    name = config.TRAIN.LR_SCHEDULER.NAME
    if name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=decay_steps, lr_min=config.TRAIN.MIN_LR, **common)
    if name == "linear":
        return PolyLRScheduler(optimizer, t_initial=decay_steps, power=1.0, lr_min=config.TRAIN.MIN_LR, **common)
    if name == "step":
        decay_t = int(config.TRAIN.LR_SCHEDULER.DECAY_EPOCHS * steps_per_epoch)
        return StepLRScheduler(optimizer, decay_t=decay_t, decay_rate=config.TRAIN.LR_SCHEDULER.DECAY_RATE, **common)
    raise ValueError(f"unknown TRAIN.LR_SCHEDULER.NAME {name!r}; valid: cosine, linear, step")
