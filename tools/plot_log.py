"""Training curves of a run, drawn from its own ``log_rank0.txt`` into a PNG.

    python tools/plot_log.py output/<MODEL.NAME>/<tag> [--out curves.png]
    python tools/plot_log.py output/<MODEL.NAME>/<tag>/linear_<dataset>_<kind>

Panels: training loss, contrastive top-1/top-5 (MoBY, SynCo; for SynCo also among the
real queue alone), the share of SynCo's synthetic logits above the positive, and
learning rate against the global step (epoch * steps per epoch + step), and for a
linear evaluation the validation top-1/top-5 against the epoch. A SynCo run's epochs
with synthetic negatives (from its config.json) are shaded. A resumed run's repeated
steps keep their last value. Without a parsable line: one error line, exit 2.
"""

import argparse
import json
import math
import os
import re
import sys

# "Train: [E/EPOCHS][i/N]\teta ... lr X\t... loss V (AVG)\t..." (main_pretrain.py, main_linear.py)
TRAIN_RE = re.compile(r"Train: \[(\d+)/\d+\]\[(\d+)/(\d+)\]\s(.*)")
# "EPOCH e <dataset> val (N images): top-1 X% top-5 Y% loss Z; best top-1 B%" (main_linear.py)
VAL_RE = re.compile(r"EPOCH (\d+) (\S+) val \((\d+) images\): top-1 (\S+)% top-5 (\S+)% loss (\S+);")
NUMBER = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"


def _field(name):
    """``name V`` or ``name V (AVG)`` -> (V, AVG or None)."""
    return re.compile(rf"(?<!\S){name} {NUMBER}(?: \({NUMBER}\))?")


FIELDS = {
    name: _field(name)
    for name in ("lr", "loss", "grad_norm", "contrast_acc1", "contrast_acc5")
    # SynCo's: its accuracies among the real queue alone, its synthetic logits above the positive
    + ("contrast_acc1_real", "contrast_acc5_real", "synthetic_above_positive")
}
# SynCo's first and last epoch with synthetic negatives in config.json: the keys, then their original names
SYNTHETIC_EPOCH_KEYS = (("SYNTHETIC_START_EPOCH", "SYNTHETIC_END_EPOCH"), ("WARMUP_EPOCHS", "COOLDOWN_EPOCHS"))


SPAN_COLOR = "gold"  # the epochs with synthetic negatives


def parse_log(path):
    """{"train": {step: {field: (value, average)}}, "val": {epoch: (top1, top5, loss)}, "dataset": str or None,
    "steps_per_epoch": int or None, "pretraining": bool}.

    A pretraining log (main_pretrain.py) is told from a linear evaluation's by its lines' ``grad_norm``.
    """
    train, val, dataset, steps_per_epoch = {}, {}, None, None
    with open(path, errors="replace") as f:
        for line in f:
            if m := TRAIN_RE.search(line):
                epoch, idx, num_steps, rest = int(m[1]), int(m[2]), int(m[3]), m[4]
                values = {}
                for name, regex in FIELDS.items():
                    if fm := regex.search(rest):
                        values[name] = (float(fm[1]), float(fm[2]) if fm[2] is not None else None)
                if "loss" in values:
                    train[epoch * num_steps + idx] = values
                    steps_per_epoch = num_steps
            elif m := VAL_RE.search(line):
                val[int(m[1])] = (float(m[4]), float(m[5]), float(m[6]))
                dataset = m[2]
    return {
        "train": dict(sorted(train.items())),
        "val": dict(sorted(val.items())),
        "dataset": dataset,
        "steps_per_epoch": steps_per_epoch,
        "pretraining": any("grad_norm" in v for v in train.values()),
    }


def synthetic_epochs(folder):
    """(first, last) epoch of a SynCo run's synthetic negatives, both included, read from the
    ``config.json`` in ``folder``; None for another framework or without the file."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            model = json.load(f).get("MODEL", {})
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if model.get("TYPE") != "synco":
        return None
    for first, last in SYNTHETIC_EPOCH_KEYS:
        if first in model and last in model:
            return int(model[first]), int(model[last])
    return None


def synthetic_span(parsed, epochs):
    """Global steps [start, end] where the epochs ``(first, last)`` overlap the logged steps of
    the pretraining log ``parsed``; None where they do not."""
    if epochs is None or not parsed["pretraining"]:
        return None
    steps, n = list(parsed["train"]), parsed["steps_per_epoch"]
    start, end = max(epochs[0] * n, steps[0]), min((epochs[1] + 1) * n - 1, steps[-1])
    return (start, end) if start < end else None


def _series(train, name, which=0):
    points = [(step, v[name][which]) for step, v in train.items() if name in v and v[name][which] is not None]
    return [s for s, _ in points], [y for _, y in points]


def _has(train, name):
    return any(name in v for v in train.values())


def _has_accuracy(train):
    """Whether the contrastive accuracies have values: BYOL logs its missing ones as nan (older runs: 0)."""
    values = (x for v in train.values() for n in ("contrast_acc1", "contrast_acc5") if n in v for x in v[n])
    return any(x is not None and math.isfinite(x) and x != 0 for x in values)


def plot_run(folder, out=None):
    """Draw the curves of the run in ``folder`` into ``out`` (default ``folder/curves.png``); returns its path.

    Raises ValueError when the folder has no log, the log no parsable line or config.json is not JSON.
    """
    log = os.path.join(folder, "log_rank0.txt")
    if not os.path.isfile(log):
        raise ValueError(f"{folder} has no log_rank0.txt: pass a run folder (<output>/<MODEL.NAME>/<tag>[/linear_*])")
    parsed = parse_log(log)
    train, val = parsed["train"], parsed["val"]
    if not train and not val:
        raise ValueError(f"{log} holds no 'Train: [...]' or 'EPOCH ... val' line to plot")

    from matplotlib.figure import Figure  # Agg canvas, no pyplot state
    from matplotlib.ticker import MaxNLocator

    span = synthetic_span(parsed, synthetic_epochs(folder)) if train else None
    shown = (
        ("loss", train),
        ("acc", _has_accuracy(train)),
        ("synthetic", _has(train, "synthetic_above_positive")),
        ("lr", train),
        ("val", val),
    )
    panels = [p for p, show in shown if show]
    fig = Figure(figsize=(4.8 * len(panels), 3.8), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        ax.grid(alpha=0.3)
        if panel == "val":
            epochs = list(val)
            for i, label in ((0, "top-1"), (1, "top-5")):
                ax.plot(epochs, [v[i] for v in val.values()], marker="o", markersize=3, label=label)
            ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{parsed['dataset']} val")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend()
            continue
        ax.set_xlabel("global step")
        if ax is not axes[0]:
            ax.sharex(axes[0])  # the step panels show the same steps
        if span is not None:
            ax.axvspan(*span, color=SPAN_COLOR, alpha=0.15, lw=0, label="synthetic negatives on")
        if panel == "loss":
            ax.plot(*_series(train, "loss"), alpha=0.4, label="batch")
            ax.plot(*_series(train, "loss", 1), label="epoch mean so far")
            ax.set(ylabel="loss", title="training loss")
            ax.legend()
        elif panel == "acc":
            synco = _has(train, "contrast_acc1_real")
            for k, color in ((1, "tab:blue"), (5, "tab:green")):
                label = f"top-{k}" + (", synthetic negatives included" if synco else "")
                ax.plot(*_series(train, f"contrast_acc{k}"), color=color, label=label)
                if synco:
                    ax.plot(*_series(train, f"contrast_acc{k}_real"), "--", color=color, label=f"top-{k}, real queue")
            ax.set(ylabel="accuracy (%)", title="contrastive accuracy (batch)")
            ax.legend(fontsize="small")
        elif panel == "synthetic":
            ax.plot(*_series(train, "synthetic_above_positive"), color="tab:red", label="batch")
            ax.plot(*_series(train, "synthetic_above_positive", 1), color="tab:purple", label="epoch mean so far")
            ax.set(ylabel="% of synthetic logits", title="synthetic negatives above the positive")
            ax.legend()
        else:
            ax.plot(*_series(train, "lr"))
            ax.set(ylabel="learning rate", title="learning rate")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle(os.path.join(*os.path.abspath(folder).split(os.sep)[-2:]))  # <tag>/linear_*, <name>/<tag>
    out = out or os.path.join(folder, "curves.png")
    fig.savefig(out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="run folder holding log_rank0.txt")
    parser.add_argument("--out", help="PNG to write (default: <folder>/curves.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.folder, args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"curves: {path}")
    return path


if __name__ == "__main__":
    main()
