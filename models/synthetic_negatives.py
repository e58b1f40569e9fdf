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
``synthetic_logits`` gives the same logits q . s_hat without building them.
s_hat does not change when s is scaled, so every kind can be written

    s = alpha u + (1 - alpha) v

with v a hard row (n1 for mixup) and u = q (kinds 1, 2, 5), n2 (3), eps (4) or
sign(q) (6): alpha = a, 1 - b, 1 - g, then t / (1 + t) for kinds 4 to 6, whose
s = n + t u is (1 + t) times that (t: their step length). ``q . s`` and
``||s||^2`` expand into the dot products q.u, q.v, u.u, v.v and u.v, computed
for all columns at once; q . v and q . n2 are entries of sim = q @ queue.T.
Since s_hat is a constant, the gradient of a logit w.r.t. q is s_hat; writing
q_d for q.detach() (the u of kinds 1, 2 and 5),

    q . s_hat = (alpha (q . u) + (1 - alpha) (q . v)) / ||alpha u + (1 - alpha) v||

has exactly that gradient when the norm is computed from detached values.
Only n1 . n2, n . eps and n . sign(q) read queue rows: these are gathered a few
queries at a time on the CPU, so they stay in cache. Kind 4 also reads the noise
for q . eps and ||eps||^2 (the one [B, N4, D] tensor, drawn once).

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
CPU_CHUNK_BYTES = 2**22


@dataclass
class SyntheticNegativeConfig:
    """Sizes and step lengths of the synthetic negatives.

    num_per_kind: N1..N6, the number of negatives of each kind per query, in the
    order interpolation, extrapolation, mixup, noise, perturbation, adversarial;
    0 disables a kind.
    """

    n_hard: int = 256
    # the counts the original code ran (its constructor's defaults): 576 per query
    num_per_kind: tuple[int, int, int, int, int, int] = (128, 128, 128, 64, 64, 64)
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
    (on sim's device) or the default one, in a fixed order: all picks, all
    coefficients, then the noise; the fields are views of these three draws.
    """
    if cfg.n_hard > sim.shape[1]:
        raise ValueError(f"n_hard={cfg.n_hard} exceeds the queue length {sim.shape[1]}")
    n1, n2, n3, n4, n5, n6 = cfg.num_per_kind
    b, device = sim.shape[0], sim.device
    dtype = sim.dtype if sim.dtype.is_floating_point else torch.get_default_dtype()
    hard_index = sim.detach().topk(cfg.n_hard, dim=1).indices  # [B, n_hard]
    picks = torch.randint(cfg.n_hard, (b, n1 + n2 + 2 * n3 + n4 + n5 + n6), generator=generator, device=device)
    coefs = torch.rand(b, n1 + n2 + n3, generator=generator, device=device, dtype=dtype)  # U[0, 1)
    interp_coef, extrap_coef, mixup_coef = coefs.split([n1, n2, n3], dim=1)
    interp_coef.mul_(cfg.interp_max)
    extrap_coef.mul_(cfg.extrap_max - 1).add_(1)
    interp_pick, extrap_pick, mixup_pick1, mixup_pick2, noise_pick, perturb_pick, adversarial_pick = picks.split(
        [n1, n2, n3, n3, n4, n5, n6], dim=1
    )
    return SyntheticChoices(
        hard_index=hard_index,
        interp_pick=interp_pick,
        interp_coef=interp_coef,
        extrap_pick=extrap_pick,
        extrap_coef=extrap_coef,
        mixup_pick1=mixup_pick1,
        mixup_pick2=mixup_pick2,
        mixup_coef=mixup_coef,
        noise_pick=noise_pick,
        noise=torch.randn(b, n4, dim, generator=generator, device=device, dtype=dtype),
        perturb_pick=perturb_pick,
        adversarial_pick=adversarial_pick,
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


def _chunk_views(buffer, sizes):
    """Views of a gather buffer [C, G, D]: the [C * G, D] block that index_select fills,
    then its mixup n1 rows, noise rows, adversarial rows (transposed, [C, D, N6]) and mixup n2 rows."""
    row1, row_noise, row_adv, row2 = buffer.split(sizes, dim=1)
    return buffer.view(-1, buffer.shape[2]), row1, row_noise, row_adv.mT, row2


def _row_products(rows, row_index, sizes, noise, sign, chunk_rows):
    """The dot products that need queue rows, a few queries at a time.

    row_index [B, G]: the queue rows of each query, G = N3 + N4 + N6 + N3 in the
    order mixup n1, noise n, adversarial n, mixup n2 (``sizes``). The rows of
    ``chunk_rows // G`` queries are gathered into one reused buffer, which stays
    in cache while it is read. noise: [B, N4, D]; sign: [B, D].
    Returns n1 . n2 [B, N3], n . eps [B, N4], n . sign(q) [B, N6].
    """
    b, d = sign.shape
    per_query = row_index.shape[1]
    if per_query == 0:
        return tuple(rows.new_empty(b, n) for n in sizes[:3])
    step = max(1, min(b, chunk_rows // per_query))  # queries per chunk
    buffer = rows.new_empty(step, per_query, d)
    whole = _chunk_views(buffer, sizes)  # made once; only a shorter last chunk needs its own
    chunks = zip(row_index.view(-1).split(step * per_query), noise.split(step), sign[:, None, :].split(step))
    products = []
    for index, eps, direction in chunks:
        flat, row1, row_noise, row_adv_t, row2 = whole if len(eps) == step else _chunk_views(buffer[: len(eps)], sizes)
        torch.index_select(rows, 0, index, out=flat)
        products.append(
            (
                torch.linalg.vecdot(row1, row2),
                torch.linalg.vecdot(row_noise, eps),
                torch.bmm(direction, row_adv_t),  # [chunk, 1, N6]
            )
        )
    mix_dot, noise_dot, sign_dot = (torch.cat(p) if len(p) > 1 else p[0] for p in zip(*products, strict=True))
    return mix_dot, noise_dot, sign_dot.squeeze(1)


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
    c = choices
    picks = [c.interp_pick, c.extrap_pick, c.mixup_pick1, c.noise_pick, c.perturb_pick, c.adversarial_pick]
    n1, n2, n3, n4, n5, n6 = (p.shape[1] for p in picks)
    n = n1 + n2 + n3 + n4 + n5 + n6
    if n == 0:
        return sim.new_zeros(sim.shape[0], 0)
    rows = queue_rows.detach()
    q_d = q.detach()
    sign = q_d.sign()  # [B, D], the direction of kind 6

    # v of every column, in kind order, then mixup's n2: one gather from sim and the row norms
    index = c.hard_index.gather(1, torch.cat(picks + [c.mixup_pick2], dim=1))  # [B, N + N3] queue rows
    q_dot_v, q_dot_n2 = sim.gather(1, index).split([n, n3], dim=1)  # differentiable
    v_sq, n2_sq = torch.linalg.vector_norm(rows, dim=1).square().take(index).split([n, n3], dim=1)
    start3, start6 = n1 + n2, n - n6  # rows of mixup n1 and noise, then adversarial and mixup n2
    row_index = torch.cat([index[:, start3 : start3 + n3 + n4], index[:, start6:]], dim=1)
    chunk_rows = index.numel()  # one pass
    if rows.device.type == "cpu":
        chunk_rows = max(1, CPU_CHUNK_BYTES // (rows.shape[1] * rows.element_size()))
    mix_dot, noise_dot, sign_dot = _row_products(rows, row_index, [n3, n4, n6, n3], c.noise, sign, chunk_rows)

    # the per-query u of kinds 1, 2, 5 (q) and 6 (sign(q)), then eps of kind 4
    q_dot_q = (q * q_d).sum(dim=1, keepdim=True)  # [B, 1], value ||q||^2, gradient q_d
    q_dot_sign = (q * sign).sum(dim=1, keepdim=True)  # [B, 1], gradient sign(q)
    q_sq = q_dot_q.detach()
    sign_sq = torch.linalg.vector_norm(sign, ord=0, dim=1, keepdim=True)  # ||sign(q)||^2: nonzero entries
    q_dot_eps = torch.bmm(q[:, None, :], c.noise.transpose(1, 2)).squeeze(1)  # [B, N4]
    eps_sq = torch.linalg.vector_norm(c.noise, dim=2).square()

    def per_column(of_q, of_n2, of_eps, of_sign):  # [B, N] from the values for each u
        return torch.cat([of_q.expand(-1, n1 + n2), of_n2, of_eps, of_q.expand(-1, n5), of_sign.expand(-1, n6)], 1)

    q_dot_u = per_column(q_dot_q, q_dot_n2, q_dot_eps, q_dot_sign)
    u_sq = per_column(q_sq, n2_sq, eps_sq, sign_sq)
    q_dot_n = q_dot_v.detach()
    u_dot_v = torch.cat([q_dot_n[:, :start3], mix_dot, noise_dot, q_dot_n[:, start3 + n3 + n4 : start6], sign_dot], 1)

    alpha = torch.cat([c.interp_coef, 1 - c.extrap_coef, 1 - c.mixup_coef], dim=1)
    for count, step in ((n4, cfg.noise_std), (n5, cfg.perturb_step), (n6, cfg.adversarial_step)):
        alpha = F.pad(alpha, (0, count), value=step / (1 + step))
    beta = 1 - alpha
    return torch.lerp(q_dot_v, q_dot_u, alpha) / _norm_of_expansion(alpha, beta, u_sq, v_sq, u_dot_v)


def _norm_of_expansion(alpha, beta, u_sq, v_sq, u_dot_v):
    """||alpha u + beta v|| from alpha^2 u.u + beta^2 v.v + 2 alpha beta u.v, kept away from rounding noise.

    When s is (nearly) 0 the terms cancel and their sum is rounding error; the
    norm is then held at sqrt(eps * sum |terms|), so that the logit, whose
    numerator is rounding error too, stays small instead of blowing up.
    """
    squares = torch.addcmul(alpha * alpha * u_sq, beta * beta, v_sq)  # >= 0
    cross = 2 * alpha * beta * u_dot_v
    floor = (squares + cross.abs()) * torch.finfo(squares.dtype).eps
    return torch.maximum(squares + cross, floor).sqrt().clamp_min(NORM_EPS)
