"""Cost of SynCo's synthetic negatives next to the plain MoBY loss, on the CPU.

    PYTHONPATH=. python benchmarks/bench_synthetic_negatives.py [--batch 64 128] [--repeats 30]

Times forward + backward w.r.t. the queries of
  (a) MoBY:      cross_entropy(cat([q.k, q @ queue.T]) / T)
  (b) SynCo:     the same with ``synthetic_logits`` appended (hard sets and draws included)
  (c) reference: the same with the logits of ``synthetic_vectors`` appended
and prints the medians and the ratios to (a).
"""

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from models.synthetic_negatives import (
    SyntheticNegativeConfig,
    draw_choices,
    synthetic_logits,
    synthetic_vectors,
)

TEMPERATURE = 0.2


def moby_step(q, k, queue_rows, cfg):
    sim = q @ queue_rows.T  # [B, K]
    positive = (q * k).sum(dim=1, keepdim=True)
    return [positive, sim]


def synco_step(q, k, queue_rows, cfg):
    columns = moby_step(q, k, queue_rows, cfg)
    choices = draw_choices(columns[1], q.shape[1], cfg)
    return columns + [synthetic_logits(q, queue_rows, columns[1], choices, cfg)]


def reference_step(q, k, queue_rows, cfg):
    columns = moby_step(q, k, queue_rows, cfg)
    choices = draw_choices(columns[1], q.shape[1], cfg)
    vectors = torch.cat(synthetic_vectors(q, queue_rows, choices, cfg), dim=1)  # [B, N, D]
    return columns + [torch.einsum("bd,bnd->bn", q, vectors)]


def loss_step(step, features, k, queue_rows, cfg):
    """One forward + backward of the InfoNCE loss with the columns of ``step``."""
    q = F.normalize(features, dim=1)
    logits = torch.cat(step(q, k, queue_rows, cfg), dim=1) / TEMPERATURE
    labels = torch.zeros(q.shape[0], dtype=torch.long)
    F.cross_entropy(logits, labels).backward()
    features.grad = None


def median_times(steps, features, k, queue_rows, cfg, repeats):
    """Median seconds of one forward + backward of each step; the steps take turns,
    so that a change in the machine's load affects them alike."""
    times = [[] for _ in steps]
    for i in range(repeats + 3):
        for step, step_times in zip(steps, times, strict=True):
            start = time.perf_counter()
            loss_step(step, features, k, queue_rows, cfg)
            if i >= 3:  # warm-up
                step_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n-hard", type=int, default=256)
    parser.add_argument("--num-per-kind", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = SyntheticNegativeConfig(n_hard=args.n_hard, num_per_kind=(args.num_per_kind,) * 6)
    queue_rows = F.normalize(torch.randn(args.queue, args.dim), dim=1)  # [K, D]
    print(f"threads={torch.get_num_threads()} K={args.queue} D={args.dim} n_hard={args.n_hard} N_k={args.num_per_kind}")
    print(f"{'B':>5} {'moby ms':>9} {'synco ms':>9} {'ref ms':>9} {'synco/moby':>11} {'ref/moby':>9}")
    for batch in args.batch:
        features = torch.randn(batch, args.dim, requires_grad=True)
        k = F.normalize(torch.randn(batch, args.dim), dim=1)
        steps = (moby_step, synco_step, reference_step)
        t_moby, t_synco, t_ref = (t * 1e3 for t in median_times(steps, features, k, queue_rows, cfg, args.repeats))
        ratios = f"{t_synco / t_moby:>11.2f} {t_ref / t_moby:>9.2f}"
        print(f"{batch:>5} {t_moby:>9.2f} {t_synco:>9.2f} {t_ref:>9.2f} {ratios}")


if __name__ == "__main__":
    main()
