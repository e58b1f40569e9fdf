"""Optimizers with no weight decay on norms, biases and tokens."""

import torch

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
        return Lars(groups, lr=lr, momentum=opt.MOMENTUM, trust_coefficient=opt.TRUST_COEFFICIENT)
    raise ValueError(f"unknown TRAIN.OPTIMIZER.NAME {opt.NAME!r}; valid: adamw, sgd, lars")


class Lars(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise rate (You et al., 2017) as the original code ran it.

    For each parameter w with more than one dimension (weights of convolutions and
    linear layers), with its group's weight decay wd:

        u = g + wd * w;   u <- eta * |w| / |u| * u   (u unchanged where |w| or |u| is 0)

    1-d parameters (norms, biases) take their plain gradient, u = g. Then
    ``m <- momentum * m + u`` and ``w <- w - lr * m``.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    trust = group["trust_coefficient"] * w_norm / u_norm
                    update = update * torch.where((w_norm > 0) & (u_norm > 0), trust, torch.ones_like(trust))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss
