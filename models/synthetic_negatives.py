"""Synthetic hard negatives of SynCo, computed from the queue logits.

For each query q the ``n_hard`` queue rows most similar to it form its hard set.
Six kinds of synthetic negative are made from it, each drawn per query and used
as a constant unit vector s_hat = s / ||s||:

1. interpolation  s = a q + (1 - a) n,        a ~ U[0, interp_max)
2. extrapolation  s = q + b (n - q),           b ~ U[1, extrap_max)
3. mixup          s = g n1 + (1 - g) n2,       g ~ U[0, 1)
4. noise          s = n + noise_std * eps,     eps ~ N(0, I)
5. perturbation   s = n + perturb_step * q      (q is d(q.n)/dn)
6. adversarial    s = n + adversarial_step * sign(q)

where n, n1, n2 are rows of the hard set picked uniformly with replacement.

``synthetic_vectors`` builds these [B, N, D] vectors as written (the reference).
``synthetic_logits`` gives the same logits q . s_hat without building them:
``q . s`` and ``||s||^2`` expand into dot products of q and the rows, and
q . n is already an entry of sim = q @ queue.T. Since s_hat is a constant, the
gradient of a logit w.r.t. q is s_hat; writing q_d for q.detach(),

    q . s_hat = (alpha (q . q_d) + beta (q . n)) / ||alpha q_d + beta n||

has exactly that gradient when the norm is computed from detached values.
Kinds 1, 2 and 5 are of this form (kind 2 with alpha = 1 - b, beta = b; kind 5
with alpha = perturb_step, beta = 1) and need only gathers from sim. Kinds 3, 4
and 6 fold the same way but need n1 . n2, n . eps and n . sign(q): these read
queue rows, gathered a few queries at a time on the CPU so they stay in cache.
Kind 4 also reads the noise for q . eps (the one [B, N4, D] tensor, drawn once).

Typical use, with queue rows ``queue_rows`` [K, D]::

    sim = q @ queue_rows.T                                    # [B, K]
    choices = draw_choices(sim, q.shape[1], cfg)
    extra = synthetic_logits(q, queue_rows, sim, choices, cfg)  # [B, N1 + ... + N6]
    logits = torch.cat([positive, sim, extra], dim=1) / temperature
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# smallest norm a synthetic vector is divided by, as in F.normalize
NORM_EPS = 1e-12
# on the CPU, queue rows are gathered in chunks of about this size, to stay in cache
CPU_CHUNK_BYTES = 2**21


@dataclass
class SyntheticNegativeConfig:
    """Sizes and step lengths of the synthetic negatives.

    num_per_kind: N1..N6, the number of negatives of each kind per query, in the
    order interpolation, extrapolation, mixup, noise, perturbation, adversarial;
    0 disables a kind.
    """

    n_hard: int = 256
    num_per_kind: tuple[int, int, int, int, int, int] = (128, 128, 128, 128, 128, 128)
    interp_max: float = 0.5
    extrap_max: float = 1.5
    noise_std: float = 0.1
    perturb_step: float = 0.01
    adversarial_step: float = 0.01

    def __post_init__(self):
        if len(self.num_per_kind) != 6 or min(self.num_per_kind) < 0:
            raise ValueError(f"num_per_kind needs six counts >= 0, got {self.num_per_kind}")


@dataclass
class SyntheticChoices:
    """Every random draw behind one batch of synthetic negatives.

    ``*_pick`` tensors are positions in the hard set (long, in [0, n_hard)); map
    them to queue rows with ``queue_index``. Shapes for a batch of B queries:
    """

    hard_index: Tensor  # [B, n_hard] queue rows with the largest q . n, most similar first
    interp_pick: Tensor  # [B, N1]
    interp_coef: Tensor  # [B, N1] a in [0, interp_max)
    extrap_pick: Tensor  # [B, N2]
    extrap_coef: Tensor  # [B, N2] b in [1, extrap_max)
    mixup_pick1: Tensor  # [B, N3]
    mixup_pick2: Tensor  # [B, N3]
    mixup_coef: Tensor  # [B, N3] g in [0, 1)
    noise_pick: Tensor  # [B, N4]
    noise: Tensor  # [B, N4, D] standard normal
    perturb_pick: Tensor  # [B, N5]
    adversarial_pick: Tensor  # [B, N6]

    def queue_index(self, pick: Tensor) -> Tensor:
        """Queue rows [B, N] of hard-set positions ``pick`` [B, N]."""
        return self.hard_index.gather(1, pick)


def draw_choices(
    sim: Tensor, dim: int, cfg: SyntheticNegativeConfig, generator: torch.Generator | None = None
) -> SyntheticChoices:
    """Hard sets and all random draws for queries with similarities ``sim`` [B, K] to the queue.

    dim: the feature dimension D (for the noise). Draws come from ``generator``
    (on sim's device) or the default one, in a fixed order.
    """
    if cfg.n_hard > sim.shape[1]:
        raise ValueError(f"n_hard={cfg.n_hard} exceeds the queue length {sim.shape[1]}")
    n1, n2, n3, n4, n5, n6 = cfg.num_per_kind
    b, device = sim.shape[0], sim.device
    dtype = sim.dtype if sim.dtype.is_floating_point else torch.get_default_dtype()
    hard_index = sim.detach().topk(cfg.n_hard, dim=1).indices  # [B, n_hard]

    def pick(n):
        return torch.randint(cfg.n_hard, (b, n), generator=generator, device=device)

    def uniform(n, low, high):
        return torch.rand(b, n, generator=generator, device=device, dtype=dtype) * (high - low) + low

    return SyntheticChoices(
        hard_index=hard_index,
        interp_pick=pick(n1),
        interp_coef=uniform(n1, 0.0, cfg.interp_max),
        extrap_pick=pick(n2),
        extrap_coef=uniform(n2, 1.0, cfg.extrap_max),
        mixup_pick1=pick(n3),
        mixup_pick2=pick(n3),
        mixup_coef=uniform(n3, 0.0, 1.0),
        noise_pick=pick(n4),
        noise=torch.randn(b, n4, dim, generator=generator, device=device, dtype=dtype),
        perturb_pick=pick(n5),
        adversarial_pick=pick(n6),
    )


def synthetic_vectors(
    q: Tensor, queue_rows: Tensor, choices: SyntheticChoices, cfg: SyntheticNegativeConfig
) -> list[Tensor]:
    """The six kinds of synthetic negative as detached unit vectors, built as written.

    q: [B, D] queries; queue_rows: [K, D]. Returns six tensors [B, N_k, D]
    (N_k may be 0), kinds in order 1..6.
    """
    q = q.detach()[:, None, :]  # [B, 1, D]
    rows = queue_rows.detach()

    def hard(pick):  # [B, N, D]
        return rows[choices.queue_index(pick)]

    a = choices.interp_coef[..., None]
    b = choices.extrap_coef[..., None]
    g = choices.mixup_coef[..., None]
    vectors = [
        a * q + (1 - a) * hard(choices.interp_pick),
        q + b * (hard(choices.extrap_pick) - q),
        g * hard(choices.mixup_pick1) + (1 - g) * hard(choices.mixup_pick2),
        hard(choices.noise_pick) + cfg.noise_std * choices.noise,
        hard(choices.perturb_pick) + cfg.perturb_step * q,
        hard(choices.adversarial_pick) + cfg.adversarial_step * q.sign(),
    ]
    return [F.normalize(v, dim=-1) for v in vectors]


def _norm_of_expansion(*terms: Tensor) -> Tensor:
    """||s|| from the terms of an expansion of ||s||^2, kept away from rounding noise.

    When s is (nearly) 0 the terms cancel and their sum is rounding error; the
    norm is then held at sqrt(eps * sum |terms|), so that the logit, whose
    numerator is rounding error too, stays small instead of blowing up.
    """
    sq_norm = sum(terms)
    scale = sum(t.abs() for t in terms)
    floor = torch.finfo(sq_norm.dtype).eps * scale
    return torch.maximum(sq_norm, floor).sqrt().clamp_min(NORM_EPS)


def _row_products(rows, mix_index1, mix_index2, noise_index, adv_index, noise, sign, chunk_rows):
    """The dot products that need queue rows, a few queries at a time.

    The rows of kinds 3, 4 and 6 of ``chunk_rows // rows per query`` queries are
    gathered into one reused buffer that stays in cache while it is read.
    Index tensors: [B, N_k] queue rows; noise: [B, N4, D]; sign: [B, D].
    Returns n1 . n2 [B, N3], n . eps [B, N4], ||eps||^2 [B, N4], n . sign(q) [B, N6].
    """
    b, d = sign.shape
    sizes = [mix_index1.shape[1], mix_index2.shape[1], noise_index.shape[1], adv_index.shape[1]]
    index = torch.cat([mix_index1, mix_index2, noise_index, adv_index], dim=1)  # [B, G]
    per_query = index.shape[1]
    n_mix, _, n_noise, n_adv = sizes
    mix_dot, noise_dot, noise_sq, sign_dot = (rows.new_empty(b, n) for n in (n_mix, n_noise, n_noise, n_adv))
    if per_query == 0:
        return mix_dot, noise_dot, noise_sq, sign_dot
    step = max(1, min(b, chunk_rows // per_query))  # queries per chunk
    buffer = rows.new_empty(step * per_query, d)
    for start in range(0, b, step):
        stop = min(b, start + step)
        flat = buffer[: (stop - start) * per_query]
        torch.index_select(rows, 0, index[start:stop].reshape(-1), out=flat)
        row1, row2, row_noise, row_adv = flat.view(stop - start, per_query, d).split(sizes, dim=1)
        eps = noise[start:stop]
        torch.linalg.vecdot(row1, row2, out=mix_dot[start:stop])
        torch.linalg.vecdot(row_noise, eps, out=noise_dot[start:stop])
        torch.linalg.vector_norm(eps, dim=-1, out=noise_sq[start:stop])
        torch.bmm(sign[start:stop, None, :], row_adv.transpose(1, 2), out=sign_dot[start:stop, None, :])
    return mix_dot, noise_dot, noise_sq.square_(), sign_dot


def synthetic_logits(
    q: Tensor, queue_rows: Tensor, sim: Tensor, choices: SyntheticChoices, cfg: SyntheticNegativeConfig
) -> Tensor:
    """Cosine logits q . s_hat [B, N1 + ... + N6] of the synthetic negatives, kinds in order.

    q: [B, D] queries; queue_rows: [K, D] keys (contiguous, no gradient);
    sim: [B, K] = q @ queue_rows.T, differentiable, reused for q . n.
    The counts N_k are those of ``choices``; cfg gives the step lengths.
    The synthetic vectors are constants: the gradient reaches q through sim and
    through q itself, never queue_rows. Kinds with N_k = 0 contribute no columns.
    Equals ``einsum("bd,bnd->bn", q, cat(synthetic_vectors(...), 1))``.
    """
    rows = queue_rows.detach()
    q_d = q.detach()
    q_dot_qd = (q * q_d).sum(dim=1, keepdim=True)  # [B, 1], value ||q||^2, gradient q_d
    q_sq = q_dot_qd.detach()
    row_sq = torch.linalg.vector_norm(rows, dim=1).square()  # [K]
    sign = q_d.sign()  # [B, D], the direction of kind 6

    # one gather from sim for the picked rows of every kind
    picks = [
        choices.interp_pick,
        choices.extrap_pick,
        choices.mixup_pick1,
        choices.mixup_pick2,
        choices.noise_pick,
        choices.perturb_pick,
        choices.adversarial_pick,
    ]
    sizes = [p.shape[1] for p in picks]
    index = choices.queue_index(torch.cat(picks, dim=1))  # [B, M] queue rows
    q_dot_n = sim.gather(1, index)  # [B, M], differentiable
    idx_1, idx_2, idx_3a, idx_3b, idx_4, idx_5, idx_6 = index.split(sizes, dim=1)
    c_1, c_2, c_3a, c_3b, c_4, c_5, c_6 = q_dot_n.split(sizes, dim=1)
    n_sq_1, n_sq_2, n_sq_3a, n_sq_3b, n_sq_4, n_sq_5, n_sq_6 = row_sq[index].split(sizes, dim=1)
    if rows.device.type == "cpu":
        chunk_rows = max(1, CPU_CHUNK_BYTES // (rows.shape[1] * rows.element_size()))
    else:
        chunk_rows = index.numel()  # one pass
    mix_dot, noise_dot, noise_sq, sign_dot = _row_products(
        rows, idx_3a, idx_3b, idx_4, idx_6, choices.noise, sign, chunk_rows
    )

    def linear(alpha, beta, c, n_sq):
        # logit of s = alpha q + beta n
        norm = _norm_of_expansion(alpha * alpha * q_sq, beta * beta * n_sq, 2 * alpha * beta * c.detach())
        return (alpha * q_dot_qd + beta * c) / norm

    out = []
    if idx_1.shape[1]:
        a = choices.interp_coef
        out.append(linear(a, 1 - a, c_1, n_sq_1))
    if idx_2.shape[1]:
        b = choices.extrap_coef
        out.append(linear(1 - b, b, c_2, n_sq_2))
    if idx_3a.shape[1]:
        g = choices.mixup_coef
        norm = _norm_of_expansion(g * g * n_sq_3a, (1 - g) ** 2 * n_sq_3b, 2 * g * (1 - g) * mix_dot)
        out.append((g * c_3a + (1 - g) * c_3b) / norm)
    if idx_4.shape[1]:
        sigma = cfg.noise_std
        q_dot_eps = torch.bmm(q[:, None, :], choices.noise.transpose(1, 2)).squeeze(1)  # [B, N4]
        norm = _norm_of_expansion(n_sq_4, 2 * sigma * noise_dot, sigma * sigma * noise_sq)
        out.append((c_4 + sigma * q_dot_eps) / norm)
    if idx_5.shape[1]:
        out.append(linear(cfg.perturb_step, 1.0, c_5, n_sq_5))
    if idx_6.shape[1]:
        eta = cfg.adversarial_step
        sign_sq = sign.count_nonzero(dim=1)[:, None].to(q.dtype)  # ||sign(q)||^2
        q_dot_sign = (q * sign).sum(dim=1, keepdim=True)  # [B, 1], gradient sign(q)
        norm = _norm_of_expansion(n_sq_6, 2 * eta * sign_dot, eta * eta * sign_sq)
        out.append((c_6 + eta * q_dot_sign) / norm)
    if not out:
        return sim.new_zeros(sim.shape[0], 0)
    return torch.cat(out, dim=1)
