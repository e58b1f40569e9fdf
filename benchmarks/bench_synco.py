"""SynCo's loss next to MoBY's: time of loss + backward, and PyTorch operator calls.

    python benchmarks/bench_synco.py [--batch 64 128] [--repeats 30]

For B queries per view, a queue of K=4096 256-d keys, N_HARD=256 and N1..N6=128,
times the frameworks' own ``loss`` (both directions, hard negatives on) plus the
backward pass to the predictions, on the CPU, and counts with torch.profiler the
top-level ``aten::`` operator calls (those no other ``aten::`` op made) of one
loss forward and of one direction of it (``contrast``: view 1 against queue 2).
The last line is ``synco_over_moby_loss=<ratio at the first batch size>``.
"""

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import get_config  # noqa: E402
from models import build_model  # noqa: E402


def build(model_type, queue, n_hard, n_per_kind):
    config = get_config()
    config.defrost()
    config.merge_from_list(
        ["MODEL.TYPE", model_type, "MODEL.ENCODER", "vit_tiny", "DATA.IMG_SIZE", 32,
         "MODEL.CONTRAST_NUM_NEGATIVE", queue, "MODEL.N_HARD", n_hard, "MODEL.SYNTHETIC_START_EPOCH", 0]
        + [x for i in range(1, 7) for x in (f"MODEL.N{i}", n_per_kind)]
    )  # fmt: skip
    return build_model(config).eval()  # eval: the queue stays as it is between repeats


def inputs(batch, dim=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    online = [torch.randn(batch, dim, generator=g, requires_grad=True) for _ in range(2)]
    target = [torch.randn(batch, dim, generator=g) for _ in range(2)]
    return online, target


def loss_and_backward(model, online, target):
    model.loss(online, target)["loss"].backward()
    for p in online:
        p.grad = None


def median_seconds(models, online, target, repeats):
    """Median time of each model's loss + backward; the models take turns so load changes hit both."""
    times = {name: [] for name in models}
    for _ in range(3):
        for model in models.values():
            loss_and_backward(model, online, target)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            loss_and_backward(model, online, target)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def quiet_stderr():
    """Send file descriptor 2 to /dev/null: the profiler's C++ side logs its start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def top_level_ops(fn, *args):
    """aten:: operator calls of fn(*args) that no other aten:: op called."""
    with torch.no_grad(), quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args)
    return sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--n-hard", type=int, default=256)
    parser.add_argument("--n-per-kind", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {name: build(name, args.queue, args.n_hard, args.n_per_kind) for name in ("moby", "synco")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, K={args.queue}, D=256, "
          f"N_HARD={args.n_hard}, N1..N6={args.n_per_kind}")  # fmt: skip
    ratios = []
    for batch in args.batch:
        online, target = inputs(batch)
        t = median_seconds(models, online, target, args.repeats)
        ratios.append(t["synco"] / t["moby"])
        print(f"B={batch:4d}  moby {t['moby'] * 1e3:7.2f} ms  synco {t['synco'] * 1e3:7.2f} ms  "
              f"ratio {ratios[-1]:.2f}")  # fmt: skip
    online, target = inputs(args.batch[0])
    pred1, key2 = F.normalize(online[0], dim=1), F.normalize(target[1], dim=1)  # as in the loss
    for name, model in models.items():
        both = top_level_ops(model.loss, online, target)
        one = top_level_ops(model.contrast, pred1, key2, model.queue2)
        print(f"top-level aten ops, B={args.batch[0]}: {name} loss forward {both} (both directions), "
              f"one direction (contrast) {one}")  # fmt: skip
    print(f"synco_over_moby_loss={ratios[0]:.2f}")


if __name__ == "__main__":
    main()
