"""Optimizers: no weight decay on BatchNorms and biases (a ResNet), and LARS as the original ran it."""

import argparse

import pytest
import torch
import torch.nn as nn

from config import get_config
from models.resnet import resnet50
from optimizer import Lars, build_optimizer, param_groups


def config_of(cfg, *opts):
    return get_config(argparse.Namespace(cfg=cfg, opts=[str(o) for o in opts] or None))


def test_resnet_batchnorms_and_biases_are_not_decayed():
    torch.manual_seed(0)
    model = nn.Sequential(resnet50(), nn.Linear(2048, 8))  # a bias, as in the heads
    optimizer = build_optimizer(config_of("configs/moby_resnet50.yaml"), model)
    decayed, plain = optimizer.param_groups
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.05, 0.0)
    norms = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(plain["params"]) == ids(norms) | {id(model[1].bias)}
    assert ids(decayed["params"]) == ids(convs) | {id(model[1].weight)}

    # a step on zero gradients: only weight decay moves anything
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    optimizer.step()
    for p, old in zip(model.parameters(), before):
        moved = not torch.equal(p, old)
        assert moved == (id(p) in ids(decayed["params"]) and bool(old.any())), p.shape


def reference_lars(params, grads, lr, momentum, weight_decays, eta, steps):
    """The original code's LARS update, one tensor at a time in float64."""
    params = [p.double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for step in range(steps):
        for i, (p, wd) in enumerate(zip(params, weight_decays)):
            u = grads[step][i].double()
            if p.ndim > 1:
                u = u + wd * p
                w_norm, u_norm = p.norm().item(), u.norm().item()
                if w_norm > 0 and u_norm > 0:
                    u = u * (eta * w_norm / u_norm)
            bufs[i] = momentum * bufs[i] + u
            params[i] = p - lr * bufs[i]
    return params


def test_lars_matches_the_original_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[2].weight.zero_()  # |w| = 0: no trust ratio, the plain decayed gradient
    groups = param_groups(model, weight_decay=0.1)
    start = [p.detach().clone() for p in model.parameters()]
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(3)]
    optimizer = Lars(groups, lr=0.5, momentum=0.9, trust_coefficient=0.02)
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.clone()
        optimizer.step()
    wds = [0.1 if p.ndim > 1 else 0.0 for p in model.parameters()]
    expected = reference_lars(start, grads, lr=0.5, momentum=0.9, weight_decays=wds, eta=0.02, steps=3)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad_scale", [1e-4, 1.0, 1e3])
def test_lars_step_is_eta_times_the_weight_norm(grad_scale):
    """Without momentum a matrix moves by exactly lr * eta * |w|, whatever the gradient's size;
    a vector (norm, bias) takes a plain SGD step."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    b = nn.Parameter(torch.randn(6, dtype=torch.float64))
    w.grad, b.grad = grad_scale * torch.randn_like(w), grad_scale * torch.randn_like(b)
    w0, b0 = w.detach().clone(), b.detach().clone()
    Lars([w, b], lr=0.3, momentum=0.0, weight_decay=1e-6, trust_coefficient=1e-3).step()
    assert (w - w0).norm().item() == pytest.approx(0.3 * 1e-3 * w0.norm().item(), rel=1e-12)
    torch.testing.assert_close(b.detach(), b0 - 0.3 * b.grad, rtol=1e-14, atol=0)  # no decay on a vector


def test_trust_coefficient_comes_from_the_config():
    model = nn.Linear(4, 4)
    config = config_of("configs/byol_resnet50.yaml")
    assert [g["trust_coefficient"] for g in build_optimizer(config, model).param_groups] == [1e-3, 1e-3]
    config = config_of("configs/byol_resnet50.yaml", "TRAIN.OPTIMIZER.TRUST_COEFFICIENT", 0.02)
    optimizer = build_optimizer(config, model)
    assert isinstance(optimizer, Lars) and optimizer.param_groups[0]["trust_coefficient"] == 0.02
