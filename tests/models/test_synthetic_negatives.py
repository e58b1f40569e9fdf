"""SynCo's synthetic negatives: the fast logits against the materialised vectors,
the vectors against their formulas, and the random draws."""

import pytest
import torch
import torch.nn.functional as F

from models import synthetic_negatives
from models.synthetic_negatives import (
    SyntheticNegativeConfig,
    draw_choices,
    synthetic_logits,
    synthetic_vectors,
)

B, K, D, N_HARD = 8, 64, 32, 16
KIND_NAMES = ["interpolation", "extrapolation", "mixup", "noise", "perturbation", "adversarial"]
TOLERANCES = {torch.float64: dict(rtol=1e-5, atol=1e-5), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def make_batch(num_per_kind, dtype=torch.float64, seed=0, unit=True):
    """Queries q [B, D] (leaf, requires grad), queue rows [K, D], config and draws."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=gen, dtype=dtype)
    queue_rows = torch.randn(K, D, generator=gen, dtype=dtype)
    if unit:
        q, queue_rows = F.normalize(q, dim=1), F.normalize(queue_rows, dim=1)
    q.requires_grad_(True)
    cfg = SyntheticNegativeConfig(n_hard=N_HARD, num_per_kind=tuple(num_per_kind))
    choices = draw_choices(q.detach() @ queue_rows.T, D, cfg, generator=gen)
    return q, queue_rows, cfg, choices


def fast_and_reference(q, queue_rows, cfg, choices, seed=1):
    """Values and q-gradients of a random linear function of the fast and the reference logits."""
    sim = q @ queue_rows.T
    fast = synthetic_logits(q, queue_rows, sim, choices, cfg)
    weights = torch.randn(fast.shape, generator=torch.Generator().manual_seed(seed), dtype=q.dtype)
    (grad_fast,) = torch.autograd.grad((fast * weights).sum(), q)

    vectors = torch.cat(synthetic_vectors(q, queue_rows, choices, cfg), dim=1)  # [B, N, D]
    reference = torch.einsum("bd,bnd->bn", q, vectors)
    (grad_ref,) = torch.autograd.grad((reference * weights).sum(), q)
    return fast, reference, grad_fast, grad_ref


def hard_rows(queue_rows, choices, pick):
    return queue_rows[choices.queue_index(pick)]  # [B, N, D]


# ---------------------------------------------------------------- fast logits = reference

ONE_KIND = [tuple(5 if i == kind else 0 for i in range(6)) for kind in range(6)]
MIXED = [(3, 0, 2, 1, 0, 4), (1, 1, 1, 1, 1, 1), (7, 2, 0, 5, 3, 0)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_per_kind", ONE_KIND + MIXED, ids=KIND_NAMES + ["mixed"] * len(MIXED))
def test_logits_and_gradient_match_reference(num_per_kind, dtype):
    q, queue_rows, cfg, choices = make_batch(num_per_kind, dtype)
    fast, reference, grad_fast, grad_ref = fast_and_reference(q, queue_rows, cfg, choices)
    assert fast.shape == (B, sum(num_per_kind))
    torch.testing.assert_close(fast, reference, **TOLERANCES[dtype])
    torch.testing.assert_close(grad_fast, grad_ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("queries_per_chunk", [1, 3])
def test_chunked_row_products_match_reference(monkeypatch, queries_per_chunk):
    # kinds 3, 4 and 6 gather queue rows a few queries at a time (here 1 or 3 of 8)
    num_per_kind = (2, 0, 3, 4, 0, 5)
    rows_per_query = 2 * 3 + 4 + 5
    monkeypatch.setattr(synthetic_negatives, "CPU_CHUNK_BYTES", queries_per_chunk * rows_per_query * D * 8)
    q, queue_rows, cfg, choices = make_batch(num_per_kind)
    fast, reference, grad_fast, grad_ref = fast_and_reference(q, queue_rows, cfg, choices)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-5, atol=1e-5)


def test_matches_reference_for_vectors_that_are_not_unit():
    # the expansions use the actual norms of q and of the rows
    q, queue_rows, cfg, choices = make_batch((2, 3, 4, 5, 6, 7), unit=False)
    fast, reference, grad_fast, grad_ref = fast_and_reference(q, queue_rows, cfg, choices)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-5, atol=1e-5)


def test_default_config_matches_reference():
    q, queue_rows, _, _ = make_batch([0] * 6)
    cfg = SyntheticNegativeConfig(n_hard=N_HARD)
    choices = draw_choices(q.detach() @ queue_rows.T, D, cfg, generator=torch.Generator().manual_seed(3))
    fast, reference, grad_fast, grad_ref = fast_and_reference(q, queue_rows, cfg, choices)
    assert fast.shape == (B, 3 * 128 + 3 * 64)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-5, atol=1e-5)


def test_all_kinds_disabled_gives_no_columns():
    q, queue_rows, cfg, choices = make_batch([0] * 6)
    out = synthetic_logits(q, queue_rows, q @ queue_rows.T, choices, cfg)
    assert out.shape == (B, 0)
    assert all(v.shape == (B, 0, D) for v in synthetic_vectors(q, queue_rows, choices, cfg))


def test_gradient_reaches_q_only():
    q, queue_rows, cfg, choices = make_batch((2, 2, 2, 2, 2, 2))
    queue_rows.requires_grad_(True)
    out = synthetic_logits(q, queue_rows, q @ queue_rows.detach().T, choices, cfg)
    out.sum().backward()
    assert queue_rows.grad is None
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vanishing_vector_gives_small_finite_logit(dtype):
    # a = 0.5 with n = -q makes s = 0: the expansion of ||s|| is pure rounding error,
    # yet the logit stays near the reference's 0 (F.normalize maps 0 to 0)
    q, queue_rows, cfg, choices = make_batch((4, 0, 0, 0, 0, 0), dtype)
    queue_rows = queue_rows.clone()
    queue_rows[:B] = -q.detach()
    choices.hard_index[:, 0] = torch.arange(B)  # each query's first hard row is -q
    choices.interp_pick.zero_()
    choices.interp_coef.fill_(0.5)
    fast, reference, grad_fast, _ = fast_and_reference(q, queue_rows, cfg, choices)
    assert torch.isfinite(fast).all() and torch.isfinite(grad_fast).all()
    torch.testing.assert_close(reference, torch.zeros_like(reference), rtol=0, atol=1e-6)
    atol = 1e-6 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(fast, reference, rtol=0, atol=atol)


# ---------------------------------------------------------------- the vectors follow their formulas


def test_vectors_are_unit_and_detached():
    q, queue_rows, cfg, choices = make_batch((3, 4, 5, 6, 7, 8))
    for name, v in zip(KIND_NAMES, synthetic_vectors(q, queue_rows, choices, cfg), strict=True):
        assert not v.requires_grad, name
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(v.shape[:2], dtype=v.dtype), msg=name)


def test_vectors_follow_formulas():
    q, queue_rows, cfg, c = make_batch((3, 4, 5, 6, 7, 8))
    v1, v2, v3, v4, v5, v6 = synthetic_vectors(q, queue_rows, c, cfg)
    q = q.detach()
    # check a few entries one at a time, indexing the queue by hand
    for b, j in [(0, 0), (0, 1), (5, 0), (5, 2)]:
        qb = q[b]
        a, beta, g = c.interp_coef[b, j], c.extrap_coef[b, j], c.mixup_coef[b, j]
        n1, n2, n3a, n3b, n4, n5, n6 = (
            queue_rows[c.hard_index[b, pick[b, j]]]
            for pick in (
                c.interp_pick,
                c.extrap_pick,
                c.mixup_pick1,
                c.mixup_pick2,
                c.noise_pick,
                c.perturb_pick,
                c.adversarial_pick,
            )
        )
        expected = [
            a * qb + (1 - a) * n1,
            qb + beta * (n2 - qb),
            g * n3a + (1 - g) * n3b,
            n4 + cfg.noise_std * c.noise[b, j],
            n5 + cfg.perturb_step * qb,
            n6 + cfg.adversarial_step * qb.sign(),
        ]
        for name, v, e in zip(KIND_NAMES, (v1, v2, v3, v4, v5, v6), expected, strict=True):
            torch.testing.assert_close(v[b, j], e / e.norm(), msg=name)


def test_interpolation_moves_towards_q_and_extrapolation_away():
    q, queue_rows, cfg, c = make_batch((10, 10, 0, 0, 0, 0))
    v1, v2 = synthetic_vectors(q, queue_rows, c, cfg)[:2]
    q = q.detach()
    cos_n1 = torch.einsum("bd,bnd->bn", q, hard_rows(queue_rows, c, c.interp_pick))
    cos_n2 = torch.einsum("bd,bnd->bn", q, hard_rows(queue_rows, c, c.extrap_pick))
    cos_s1, cos_s2 = torch.einsum("bd,bnd->bn", q, v1), torch.einsum("bd,bnd->bn", q, v2)
    assert (cos_s1 > cos_n1)[c.interp_coef > 0].all()
    assert (cos_s2 < cos_n2)[c.extrap_coef > 1].all()


def test_adversarial_counts_zero_coordinates():
    q, queue_rows, cfg, c = make_batch((0, 0, 0, 0, 0, 6))
    with torch.no_grad():
        q[:, : D // 2] = 0  # sign(q) has D / 2 nonzero entries
    fast, reference, grad_fast, grad_ref = fast_and_reference(q, queue_rows, cfg, c)
    torch.testing.assert_close(fast, reference)
    torch.testing.assert_close(grad_fast, grad_ref)


# ---------------------------------------------------------------- the draws


def test_hard_index_is_top_similarity():
    q, queue_rows, cfg, c = make_batch((1,) * 6)
    sim = q.detach() @ queue_rows.T
    expected = sim.argsort(dim=1, descending=True)[:, :N_HARD]
    assert c.hard_index.shape == (B, N_HARD)
    assert torch.equal(c.hard_index.sort(dim=1).values, expected.sort(dim=1).values)
    # every row outside the hard set is at most as similar as every row inside
    inside = sim.gather(1, c.hard_index).min(dim=1).values
    outside = sim.scatter(1, c.hard_index, float("-inf")).max(dim=1).values
    assert (outside <= inside).all()


def test_draws_lie_in_their_ranges():
    q, queue_rows, cfg, c = make_batch((50, 60, 70, 80, 90, 100))
    picks = [c.interp_pick, c.extrap_pick, c.mixup_pick1, c.mixup_pick2, c.noise_pick, c.perturb_pick]
    for pick, n in zip(picks + [c.adversarial_pick], (50, 60, 70, 70, 80, 90, 100), strict=True):
        assert pick.shape == (B, n) and pick.dtype == torch.long
        assert pick.min() >= 0 and pick.max() < N_HARD
    assert c.interp_coef.min() >= 0 and c.interp_coef.max() < cfg.interp_max
    assert c.extrap_coef.min() >= 1 and c.extrap_coef.max() < cfg.extrap_max
    assert c.mixup_coef.min() >= 0 and c.mixup_coef.max() < 1
    assert c.noise.shape == (B, 80, D)
    assert abs(c.noise.mean()) < 0.05 and abs(c.noise.std() - 1) < 0.05


def test_same_seed_same_choices():
    _, _, _, first = make_batch((3, 3, 3, 3, 3, 3), seed=7)
    _, _, _, again = make_batch((3, 3, 3, 3, 3, 3), seed=7)
    _, _, _, other = make_batch((3, 3, 3, 3, 3, 3), seed=8)
    for name, value in vars(first).items():
        assert torch.equal(value, getattr(again, name)), name
    assert not torch.equal(first.noise, other.noise)
    assert not torch.equal(first.interp_pick, other.interp_pick)


def test_bad_config_fails():
    with pytest.raises(ValueError):
        SyntheticNegativeConfig(num_per_kind=(1, 2, 3))
    with pytest.raises(ValueError):
        draw_choices(torch.zeros(B, K), D, SyntheticNegativeConfig(n_hard=K + 1))
