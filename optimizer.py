"""Optimizers with no weight decay on norms, biases and tokens."""

import torch
from timm.optim import Lars

# parameters whose name contains one of these are never decayed
NO_DECAY_KEYWORDS = ("cls_token", "pos_embed", "absolute_pos_embed", "relative_position_bias_table")


def param_groups(model, weight_decay):
    """Two groups of the trainable parameters: decayed, and not (1-d tensors, biases, tokens)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_KEYWORDS):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(config, model):
    """AdamW, SGD or LARS from TRAIN.OPTIMIZER, at TRAIN.BASE_LR (already scaled by the caller)."""
    opt = config.TRAIN.OPTIMIZER
    groups = param_groups(model, config.TRAIN.WEIGHT_DECAY)
    lr = config.TRAIN.BASE_LR
    name = opt.NAME.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, eps=opt.EPS, betas=tuple(opt.BETAS))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=opt.MOMENTUM, nesterov=True)
    if name == "lars":
        # trust-ratio scaling only where weight decay applies, as in BYOL / SimCLR
        return Lars(groups, lr=lr, momentum=opt.MOMENTUM)
    raise ValueError(f"unknown TRAIN.OPTIMIZER.NAME {opt.NAME!r}; valid: adamw, sgd, lars")
