import glob
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config, views

from config import get_config
from models import build_model
from models.base import cosine_momentum
from models.byol import regression_loss

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -----------------------------------------------------------------------------
# Losses against plain re-expressions and closed forms
# -----------------------------------------------------------------------------


def reference_info_nce(q, k, queue, temperature):
    """-log softmax of the positive, one sample at a time, straight from the definition."""
    losses = []
    for i in range(q.shape[0]):
        qi = F.normalize(q[i], dim=0)
        ki = F.normalize(k[i], dim=0)
        pos = torch.exp(qi @ ki / temperature)
        neg = sum(torch.exp(qi @ queue[:, j] / temperature) for j in range(queue.shape[1]))
        losses.append(-torch.log(pos / (pos + neg)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("model_type", ["moby", "synco"])
def test_contrastive_loss_matches_reference(model_type):
    torch.manual_seed(0)
    # synco before its first hard-negative epoch is exactly MoBY
    model = build_model(small_config(model_type, MODEL__SYNTHETIC_START_EPOCH=1)).eval()
    pred1, pred2, key1, key2 = (torch.randn(4, 16, dtype=torch.float64) for _ in range(4))
    model.double()
    out = model.loss((pred1, pred2), (key1, key2))
    t = model.temperature
    expected = reference_info_nce(pred1, key2, model.queue2, t) + reference_info_nce(pred2, key1, model.queue1, t)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-9, atol=1e-9)
    assert out["logits"].shape == (8, 1 + 16)
    assert (out["labels"] == 0).all()


def test_contrastive_loss_uniform_logits_closed_form():
    """Queries orthogonal to their key and to every queue entry: each direction costs log(K + 1)."""
    model = build_model(small_config("moby")).eval()
    dim, k = 16, 16
    q = F.one_hot(torch.zeros(4, dtype=torch.long), dim).float()  # e0
    key = F.one_hot(torch.ones(4, dtype=torch.long), dim).float()  # e1
    model.queue1.copy_(F.one_hot(torch.full((k,), 2), dim).float().T)  # every entry e2
    model.queue2.copy_(F.one_hot(torch.full((k,), 3), dim).float().T)
    out = model.loss((q, q), (key, key))
    assert out["loss"].item() == pytest.approx(2 * math.log(k + 1), rel=1e-6)


def reference_byol(p1, p2, z1, z2):
    """The original code's BYOL loss, one sample at a time: the mean of the two directions'
    batch means of ``2 - 2 cos``, 0.5 * (mean_b(2 - 2 cos(p1, z2)) + mean_b(2 - 2 cos(p2, z1)))."""
    direction1 = sum(2 - 2 * (p @ z) / (p.norm() * z.norm()) for p, z in zip(p1, z2)) / len(p1)
    direction2 = sum(2 - 2 * (p @ z) / (p.norm() * z.norm()) for p, z in zip(p2, z1)) / len(p2)
    return 0.5 * (direction1 + direction2)


def test_byol_loss_closed_form_and_reference():
    model = build_model(small_config("byol")).eval()
    p = torch.randn(4, 16)
    assert model.loss((p, p), (p, p))["loss"].item() == pytest.approx(0.0, abs=1e-6)
    # opposite targets: 2 - 2 * (-1) = 4 in each direction, and their mean is 4 (a sum would give 8)
    assert model.loss((p, p), (-p, -p))["loss"].item() == pytest.approx(4.0, abs=1e-5)
    assert regression_loss(p, 3 * p).abs().max() < 1e-6  # scale invariant


def test_byol_loss_and_gradient_match_the_original_formula():
    torch.manual_seed(0)
    model = build_model(small_config("byol")).eval()
    p1, p2, z1, z2 = (torch.randn(4, 16, dtype=torch.float64) for _ in range(4))
    ours = [t.clone().requires_grad_(True) for t in (p1, p2)]
    theirs = [t.clone().requires_grad_(True) for t in (p1, p2)]
    loss = model.loss(ours, (z1, z2))["loss"]
    expected = reference_byol(*theirs, z1, z2)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    loss.backward()
    expected.backward()
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-12, atol=1e-12)


# -----------------------------------------------------------------------------
# Gradients and the momentum target
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["moby", "byol", "synco"])
def test_gradient_reaches_every_online_parameter_and_no_target(model_type):
    torch.manual_seed(0)
    model = build_model(small_config(model_type, MODEL__SYNTHETIC_START_EPOCH=0)).train()
    model(*views())["loss"].backward()
    for name, p in model.named_parameters():
        if name.startswith(("encoder_k.", "projector_k.")):
            assert not p.requires_grad and p.grad is None, name
        elif name == "encoder.pos_embed":  # the fixed sin-cos embedding
            assert not p.requires_grad
        else:
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_target_starts_as_copy_of_online():
    model = build_model(small_config("moby"))
    online = dict(model.encoder.named_parameters())
    for name, p in model.encoder_k.named_parameters():
        assert torch.equal(p, online[name])


def test_cosine_momentum_schedule():
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 25, 100) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)


def test_momentum_update_follows_formula_and_advances_step():
    torch.manual_seed(0)
    model = build_model(small_config("byol", MODEL__CONTRAST_MOMENTUM=0.9), steps_per_epoch=5).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(*views())["loss"].backward()
    opt.step()  # online now differs from target
    online = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    target = {n: p.detach().clone() for n, p in model.encoder_k.named_parameters()}
    assert int(model.step) == 1
    m = cosine_momentum(0.9, 1, 5 * 4)
    assert model.momentum == pytest.approx(m)
    model(*views(seed=1))
    for name, p in model.encoder_k.named_parameters():
        torch.testing.assert_close(p, m * target[name] + (1 - m) * online[name])
    assert int(model.step) == 2


def test_eval_forward_changes_nothing():
    model = build_model(small_config("moby")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(*views())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# -----------------------------------------------------------------------------
# Queues and state
# -----------------------------------------------------------------------------


def test_queue_wraps_around():
    model = build_model(small_config("moby"))  # queue of 16
    keys = [F.normalize(torch.randn(6 if i == 0 else 4, 16), dim=1) for i in range(6)]
    model.enqueue(keys[1], -keys[1])
    assert int(model.queue_ptr) == 4
    for i in range(2, 6):
        model.enqueue(keys[i], -keys[i])
    assert int(model.queue_ptr) == 4  # 5 batches of 4 in a queue of 16
    torch.testing.assert_close(model.queue1[:, 0:4], keys[5].T)  # the 5th batch overwrote the 1st
    torch.testing.assert_close(model.queue1[:, 4:8], keys[2].T)
    torch.testing.assert_close(model.queue2[:, 12:16], -keys[4].T)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        model.enqueue(keys[0], keys[0])


def test_training_forward_enqueues_target_keys():
    torch.manual_seed(0)
    model = build_model(small_config("moby")).train()
    x1, x2 = views()
    model(x1, x2)
    with torch.no_grad():
        key1 = F.normalize(model.projector_k(model.encoder_k(x1)), dim=1)
    # the target changed by at most the momentum step since; BN in train mode uses batch stats
    torch.testing.assert_close(model.queue1[:, :4], key1.T, atol=1e-3, rtol=1e-3)
    assert int(model.queue_ptr) == 4


def test_step_counter_and_queues_survive_save_and_load(tmp_path):
    model = build_model(small_config("synco", MODEL__SYNTHETIC_START_EPOCH=0), steps_per_epoch=3).train()
    for seed in range(2):
        model(*views(seed=seed))
    path = tmp_path / "state.pth"
    torch.save(model.state_dict(), path)
    restored = build_model(small_config("synco", MODEL__SYNTHETIC_START_EPOCH=0), steps_per_epoch=3)
    restored.load_state_dict(torch.load(path))
    assert int(restored.step) == 2 and restored.momentum == model.momentum
    assert torch.equal(restored.queue1, model.queue1) and torch.equal(restored.queue_ptr, model.queue_ptr)
    assert {"step", "queue1", "queue2", "queue_ptr"} <= set(model.state_dict())


# -----------------------------------------------------------------------------
# SynCo specifics
# -----------------------------------------------------------------------------


def test_synco_hard_negatives_switch_on_and_off_at_configured_epochs():
    torch.manual_seed(0)
    # 2 steps per epoch; synthetic negatives in epochs 1 and 2 only
    model = build_model(
        small_config("synco", MODEL__SYNTHETIC_START_EPOCH=1, MODEL__SYNTHETIC_END_EPOCH=2), steps_per_epoch=2
    ).train()
    widths = []
    for step in range(8):
        widths.append(model(*views(seed=step))["logits"].shape[1])
    plain, extended = 1 + 16, 1 + 16 + (2 + 3 + 4 + 5 + 6 + 7)
    assert widths == [plain, plain, extended, extended, extended, extended, plain, plain]


def test_synco_honours_every_count_and_zero_disables_a_kind():
    model = build_model(small_config("synco", MODEL__SYNTHETIC_START_EPOCH=0, MODEL__N3=0, MODEL__N5=1)).train()
    out = model(*views())
    assert out["logits"].shape == (8, 1 + 16 + 2 + 3 + 0 + 5 + 1 + 7)


def synco_and_moby_losses():
    """The ``loss`` outputs of SynCo (synthetic negatives on) and MoBY, with the same weights
    and queues, on the same predictions and keys."""
    torch.manual_seed(0)
    synco = build_model(small_config("synco", MODEL__SYNTHETIC_START_EPOCH=0)).eval()
    moby = build_model(small_config("moby")).eval()
    moby.load_state_dict(synco.state_dict())
    p = [torch.randn(4, 16) for _ in range(4)]
    return synco.loss(p[:2], p[2:]), moby.loss(p[:2], p[2:])


def test_synco_loss_exceeds_moby_loss_on_same_inputs():
    """Hard negatives only add terms to the softmax denominator."""
    synco, moby = synco_and_moby_losses()
    assert synco["loss"] > moby["loss"]


def test_synco_logits_start_with_mobys():
    """Columns [0, real_columns) of SynCo's logits are MoBY's (positive and queue); the synthetic ones follow."""
    out, moby_out = synco_and_moby_losses()
    assert out["real_columns"] == 1 + 16 and "real_columns" not in moby_out
    assert out["logits"].shape == (8, 1 + 16 + 2 + 3 + 4 + 5 + 6 + 7)
    torch.testing.assert_close(out["logits"][:, : out["real_columns"]], moby_out["logits"])


# -----------------------------------------------------------------------------
# Every shipped config
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_file", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))), ids=os.path.basename)
def test_every_config_loads_and_builds(cfg_file):
    class Args:
        cfg = cfg_file
        opts = None

    config = get_config(Args)
    framework, encoder = os.path.basename(cfg_file)[:-5].split("_", 1)
    assert config.MODEL.TYPE == framework and config.MODEL.ENCODER == encoder
    assert config.MODEL.NAME.startswith(f"{framework}__{encoder}__")
    with torch.device("meta"):  # the full-size architecture, without spending time on weights
        model = build_model(config)
    assert type(model).__name__.lower() == framework
    assert model.encoder.num_features == model.projector.linear_hidden[1].in_features
    # the drop path of the deepest block, and the ViT patch projection, as configured
    for net, rate in ((model.encoder, config.MODEL.ONLINE_DROP_PATH_RATE),
                      (model.encoder_k, config.MODEL.TARGET_DROP_PATH_RATE)):  # fmt: skip
        if encoder.startswith("resnet"):
            drop_path = net.layer4[-1].drop_path  # None at rate 0
        else:
            drop_path = (net.blocks[-1] if encoder.startswith("vit") else net.layers[-1].blocks[-1]).drop_path1
        assert getattr(drop_path, "drop_prob", 0.0) == pytest.approx(rate)
    if encoder.startswith("vit"):
        assert model.encoder.patch_embed.proj.weight.requires_grad != config.MODEL.STOP_GRAD_CONV1
