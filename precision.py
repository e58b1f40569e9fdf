"""Precision (AMP_OPT_LEVEL) and the one optimisation step of every training loop.

autocast = amp_autocast(config, device)        # with autocast(): out = model(x)
step = build_optimizer_step(config, model, optimizer, device)  # an OptimizerStep; its grad scaler: step.scaler
grad_norm = step(loss, update)                 # backward; on ``update`` the optimizer step
"""

from functools import partial

import torch

PRECISIONS = {"": "fp32, as O0", "O0": "fp32", "O1": "fp16 autocast with a grad scaler", "O2": "bf16 autocast"}
AMP_DTYPES = {"O1": torch.float16, "O2": torch.bfloat16}


def amp_autocast(config, device):
    """A context factory: autocast to AMP_OPT_LEVEL's dtype (O1 fp16, O2 bf16), or nothing."""
    return partial(
        torch.autocast,
        device_type=device.type,
        dtype=AMP_DTYPES.get(config.AMP_OPT_LEVEL),
        enabled=config.AMP_OPT_LEVEL in AMP_DTYPES,
    )


def set_tf32(config, device):
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores when TRAIN.TF32 (PyTorch's
    defaults differ: matmuls off, convolutions on); nothing on other devices."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.TRAIN.TF32
        torch.backends.cudnn.allow_tf32 = config.TRAIN.TF32


def precision_line(config, device):
    """The precision the run computes in (AMP_OPT_LEVEL, as config.json records it, and on CUDA
    TRAIN.TF32), as one line."""
    what = PRECISIONS[config.AMP_OPT_LEVEL]
    if device.type == "cuda":
        what += ", fp32 matmuls on TF32 tensor cores" if config.TRAIN.TF32 else ", full-fp32 matmuls (TRAIN.TF32 False)"
    return f"precision: AMP_OPT_LEVEL {config.AMP_OPT_LEVEL or repr('')} ({what}) on {device}"


class GradScaler(torch.amp.GradScaler):
    """PyTorch's grad scaler, whose state may come from a run of another precision: a checkpoint
    written under O0 or O2 holds the empty state of a disabled scaler, from which an fp16 (O1)
    resume starts afresh (PyTorch's raises)."""

    def load_state_dict(self, state_dict):
        if state_dict:
            super().load_state_dict(state_dict)


def make_grad_scaler(config, device):
    """The grad scaler of fp16 (O1); a disabled one, whose calls pass through, otherwise."""
    return GradScaler(device.type, enabled=config.AMP_OPT_LEVEL == "O1")


class OptimizerStep:
    """Backward of each loss, and every ``accumulation`` losses the optimizer step: unscale (fp16),
    clip the gradient norm of ``params`` to ``clip_grad`` (0: no clipping), step, update the
    grad scaler, zero the gradients.

    ``step(loss, update)`` returns the gradient norm (a device tensor, no host synchronisation) on
    an update when ``clip_grad`` is set or ``track_norm``, else None; without clipping the
    gradients are only measured, not rescaled. ``loss`` is divided by ``accumulation``, so an
    accumulated update equals one over the concatenated batch.
    """

    def __init__(self, optimizer, params, scaler, clip_grad=0.0, accumulation=1, track_norm=True):
        self.optimizer, self.params, self.scaler = optimizer, list(params), scaler
        self.clip_grad, self.accumulation, self.track_norm = clip_grad, max(accumulation, 1), track_norm

    def __call__(self, loss, update=True):
        self.scaler.scale(loss / self.accumulation).backward()
        return self.update() if update else None

    def update(self):
        """The optimizer step on the gradients accumulated so far; returns the gradient norm or None."""
        grad_norm = None
        if self.clip_grad or self.track_norm:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        elif self.track_norm:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def is_update(self, idx, num_steps):
        """Whether step ``idx`` of an epoch of ``num_steps`` ends an accumulation (or the epoch)."""
        return (idx + 1) % self.accumulation == 0 or idx + 1 == num_steps


def build_optimizer_step(config, model, optimizer, device, track_norm=True):
    """The OptimizerStep of ``config`` for ``model``'s trainable parameters: AMP_OPT_LEVEL's grad
    scaler (``make_grad_scaler``), TRAIN.CLIP_GRAD and TRAIN.ACCUMULATION_STEPS."""
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = make_grad_scaler(config, device)
    return OptimizerStep(optimizer, params, scaler, config.TRAIN.CLIP_GRAD, config.TRAIN.ACCUMULATION_STEPS, track_norm)
