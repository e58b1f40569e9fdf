"""Training curves of a run, drawn from its own ``log_rank0.txt`` into a PNG.

    python tools/plot_log.py output/<MODEL.NAME>/<tag> [--out curves.png]
    python tools/plot_log.py output/<MODEL.NAME>/<tag>/linear_<dataset>_<kind>

One column of panels against the epoch (a logged step at epoch + step / steps per epoch),
each with its legend to its right: training loss; contrastive top-1/top-5 (MoBY, SynCo; for
SynCo also among the real queue alone) and BYOL's top-1 among the batch; the share of
SynCo's synthetic logits above the positive; the monitors (online linear top-1 on the
training batches and on the val set, k-NN top-1/top-5); the std of the projections beside
1/sqrt(D); for a linear evaluation the val top-1/top-5; the learning rate. Thin lines: the
logged steps; markers: the epoch means, at the epoch's end (the val accuracies: after the
epoch). Top-5 of a classification with 5 classes or fewer (100% by construction) is left
out. A SynCo run's epochs with synthetic negatives (from its config.json) are shaded. A
resumed run's repeated steps keep their last value. Without a parsable line: one error
line, exit 2.
"""

import argparse
import json
import math
import os
import re
import sys

NUMBER = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"
# "Train: [E/EPOCHS][i/N]\teta ... lr X\t... loss V (AVG)\t..." (main_pretrain.py, main_linear.py)
TRAIN_RE = re.compile(r"Train: \[(\d+)/\d+\]\[(\d+)/(\d+)\]\s(.*)")
# "EPOCH e done in H:MM:SS: mean loss X ..." (main_pretrain.py; the mean over all processes)
EPOCH_DONE_RE = re.compile(rf"EPOCH (\d+) done in .*?: mean loss {NUMBER}")
# "EPOCH e <dataset> val (N images): top-1 X% top-5 Y% loss Z; best top-1 B%" (main_linear.py)
VAL_RE = re.compile(r"EPOCH (\d+) (\S+) val \((\d+) images\): top-1 (\S+)% top-5 (\S+)% loss (\S+);")
# the monitors of main_pretrain.py after epoch e:
# "EPOCH e online linear val (N images): top-1 X% top-5 Y%"
LINEAR_MONITOR_RE = re.compile(rf"EPOCH (\d+) online linear val \(\d+ images\): top-1 {NUMBER}% top-5 {NUMBER}%")
# "EPOCH e k-NN val (k=K, T=T, bank N images, M val): top-1 X% top-5 Y% in Ss"
KNN_RE = re.compile(rf"EPOCH (-?\d+)(?: \(before training\))? k-NN val \([^)]*\): top-1 {NUMBER}% top-5 {NUMBER}%")
# the number of classes: "monitors: C classes; ..." (main_pretrain.py),
# "<dataset>: N train / M val images, C classes" (main_linear.py)
CLASSES_RES = (re.compile(r"monitors: (\d+) classes"), re.compile(r"\S+: \d+ train / \d+ val images, (\d+) classes"))


def _field(name):
    """``name V`` or ``name V (AVG)`` -> (V, AVG or None)."""
    return re.compile(rf"(?<!\S){name} {NUMBER}(?: \({NUMBER}\))?")


FIELDS = {
    name: _field(name)
    for name in ("lr", "loss", "grad_norm", "contrast_acc1", "contrast_acc5")
    # SynCo's: its accuracies among the real queue alone, its synthetic logits above the positive
    + ("contrast_acc1_real", "contrast_acc5_real", "synthetic_above_positive")
    # the monitors': the online linear classifier's top-1 on the training batches, the std of the
    # normalised projections; BYOL's top-1 of each prediction among the batch's target keys
    + ("linear_acc1", "proj_std", "batch_acc1")
}
# SynCo's first and last epoch with synthetic negatives in config.json: the keys, then their original names
SYNTHETIC_EPOCH_KEYS = (("SYNTHETIC_START_EPOCH", "SYNTHETIC_END_EPOCH"), ("WARMUP_EPOCHS", "COOLDOWN_EPOCHS"))
# the most classes whose top-5 accuracy is 100% by construction
TOP5_TRIVIAL_CLASSES = 5

SPAN_COLOR = "gold"  # the epochs with synthetic negatives
SMALL_PANELS = ("proj_std", "lr")  # drawn at a reduced height
PANEL_HEIGHT = 2.3  # inches of a full panel
FIGURE_WIDTH = 9.0  # inches: the axes and, to their right, the legends


def parse_log(path):
    """The values of a run's log::

        {"train": {x: {field: (value, epoch mean so far or None)}},  # x = epoch + step / steps per epoch
         "epoch_means": {epoch: {field: mean of the whole epoch}},
         "val": {epoch: (top1, top5, loss)}, "dataset": str or None,  # a linear evaluation's
         "linear_val": {epoch: (top1, top5)}, "knn": {epoch: (top1, top5)},  # the monitors'
         "num_classes": int or None, "pretraining": bool}

    An epoch's means are the running means of its last step, which every run logs; the loss's is
    the epoch line's (``EPOCH e done ...: mean loss X``) where there is one. A pretraining log
    (main_pretrain.py) is told from a linear evaluation's by its lines' ``grad_norm``.
    """
    train, epoch_means, val, linear_val, knn = {}, {}, {}, {}, {}
    dataset, num_classes = None, None
    with open(path, errors="replace") as f:
        for line in f:
            if m := TRAIN_RE.search(line):
                epoch, idx, num_steps, rest = int(m[1]), int(m[2]), int(m[3]), m[4]
                values = {}
                for name, regex in FIELDS.items():
                    if fm := regex.search(rest):
                        values[name] = (float(fm[1]), float(fm[2]) if fm[2] is not None else None)
                if "loss" in values:
                    train[epoch + idx / num_steps] = values
                    if idx + 1 == num_steps:
                        epoch_means[epoch] = {name: mean for name, (_, mean) in values.items() if mean is not None}
            elif m := EPOCH_DONE_RE.search(line):
                epoch_means.setdefault(int(m[1]), {})["loss"] = float(m[2])
            elif m := LINEAR_MONITOR_RE.search(line):
                linear_val[int(m[1])] = (float(m[2]), float(m[3]))
            elif m := KNN_RE.search(line):
                knn[int(m[1])] = (float(m[2]), float(m[3]))
            elif m := VAL_RE.search(line):
                val[int(m[1])] = (float(m[4]), float(m[5]), float(m[6]))
                dataset = m[2]
            else:
                for regex in CLASSES_RES:
                    if m := regex.search(line):
                        num_classes = int(m[1])
    return {
        "train": dict(sorted(train.items())),
        "epoch_means": dict(sorted(epoch_means.items())),
        "val": dict(sorted(val.items())),
        "dataset": dataset,
        "linear_val": dict(sorted(linear_val.items())),
        "knn": dict(sorted(knn.items())),
        "num_classes": num_classes,
        "pretraining": any("grad_norm" in v for v in train.values()),
    }


def _model_config(folder):
    """The MODEL node of ``folder/config.json``; {} without the file."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f).get("MODEL", {})
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def synthetic_epochs(folder):
    """(first, last) epoch of a SynCo run's synthetic negatives, both included, read from the
    ``config.json`` in ``folder``; None for another framework or without the file."""
    model = _model_config(folder)
    if model.get("TYPE") != "synco":
        return None
    for first, last in SYNTHETIC_EPOCH_KEYS:
        if first in model and last in model:
            return int(model[first]), int(model[last])
    return None


def projection_dim(folder):
    """MODEL.PROJ_DIM of the ``config.json`` in ``folder``; None without it."""
    dim = _model_config(folder).get("PROJ_DIM")
    return int(dim) if dim is not None else None


def synthetic_span(parsed, epochs):
    """Epochs [start, end] (x axis) where the epochs ``(first, last)`` overlap what the pretraining
    log ``parsed`` covers (from its first logged step to its last, or to the end of its last
    finished epoch); None where they do not."""
    if epochs is None or not parsed["pretraining"]:
        return None
    xs = list(parsed["train"])
    covered_end = max([xs[-1]] + [epoch + 1 for epoch in parsed["epoch_means"]])
    start, end = max(epochs[0], xs[0]), min(epochs[1] + 1, covered_end)
    return (start, end) if start < end else None


def _steps(train, name):
    """x and value of ``name`` at its logged steps."""
    points = [(x, v[name][0]) for x, v in train.items() if name in v]
    return [x for x, _ in points], [y for _, y in points]


def _epoch_series(parsed, name):
    """x (the epoch's end) and the epoch mean of ``name`` for every epoch that has one."""
    points = [(epoch + 1, means[name]) for epoch, means in parsed["epoch_means"].items() if name in means]
    return [x for x, _ in points], [y for _, y in points]


def _after_epoch(values, i):
    """x (the epoch's end) and item ``i`` of ``{epoch: values}``."""
    return [epoch + 1 for epoch in values], [v[i] for v in values.values()]


def _has(train, name):
    return any(name in v for v in train.values())


def _has_accuracy(train):
    """Whether the contrastive accuracies have values: BYOL logs its missing ones as nan (older runs: 0)."""
    values = (x for v in train.values() for n in ("contrast_acc1", "contrast_acc5") if n in v for x in v[n])
    return any(x is not None and math.isfinite(x) and x != 0 for x in values)


def panels(parsed):
    """The names of the panels the log ``parsed`` fills, top to bottom."""
    train = parsed["train"]
    shown = (
        ("loss", train),
        ("contrast", _has_accuracy(train) or _has(train, "batch_acc1")),
        ("synthetic", _has(train, "synthetic_above_positive")),
        ("monitors", _has(train, "linear_acc1") or parsed["linear_val"] or parsed["knn"]),
        ("val", parsed["val"]),
        ("proj_std", _has(train, "proj_std")),
        ("lr", _has(train, "lr")),
    )
    return [name for name, show in shown if show]


def _draw(ax, parsed, name, color, label, style="-", step_label=None):
    """``name`` at the logged steps, thin and light, and its epoch means, with markers at the epochs' ends
    (before the first epoch ends, the thin line carries ``label``)."""
    xs, means = _epoch_series(parsed, name)
    step_label = step_label or (None if xs else label)
    ax.plot(*_steps(parsed["train"], name), style, color=color, lw=0.8, alpha=0.35, label=step_label)
    if xs:
        ax.plot(xs, means, style, color=color, marker="o", markersize=4, label=label)


def _draw_top(ax, values, name, color, marker, top5):
    """Top-1 (solid) and, with ``top5``, top-5 (dashed) of ``{epoch: (top1, top5, ...)}`` after each epoch."""
    ax.plot(*_after_epoch(values, 0), color=color, marker=marker, markersize=4, label=f"{name} top-1")
    if top5:
        ax.plot(*_after_epoch(values, 1), "--", color=color, marker=marker, markersize=4, label=f"{name} top-5")


def draw(parsed, title, span=None, proj_dim=None):
    """The figure of the log ``parsed``: ``panels(parsed)`` in one column sharing the epoch axis.

    ``span``: epochs (start, end) to shade; ``proj_dim``: D of the projections, for the 1/sqrt(D)
    line beside their std.
    """
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state
    from matplotlib.ticker import MaxNLocator

    names = panels(parsed)
    heights = [0.6 if name in SMALL_PANELS else 1.0 for name in names]
    fig = Figure(figsize=(FIGURE_WIDTH, 0.5 + PANEL_HEIGHT * sum(heights)), dpi=100, layout="constrained")
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False, height_ratios=heights)[:, 0]
    top5 = parsed["num_classes"] is None or parsed["num_classes"] > TOP5_TRIVIAL_CLASSES
    for ax, name in zip(axes, names):
        ax.grid(alpha=0.3)
        if span is not None:  # named in the first panel's legend
            label = "synthetic negatives on" if ax is axes[0] else None
            ax.axvspan(*span, color=SPAN_COLOR, alpha=0.15, lw=0, label=label)
        if name == "loss":
            _draw(ax, parsed, "loss", "tab:blue", "epoch mean", step_label="logged steps")
            ax.set(ylabel="loss", title="training loss")
        elif name == "contrast":
            synco = _has(parsed["train"], "contrast_acc1_real")
            if _has_accuracy(parsed["train"]):
                for k, color in ((1, "tab:blue"), (5, "tab:green")):
                    _draw(ax, parsed, f"contrast_acc{k}", color, f"top-{k}" + (", all negatives" if synco else ""))
                    if synco:
                        _draw(ax, parsed, f"contrast_acc{k}_real", color, f"top-{k}, real queue", style="--")
            if _has(parsed["train"], "batch_acc1"):
                _draw(ax, parsed, "batch_acc1", "tab:orange", "top-1 among the batch")
            ax.set(ylabel="accuracy (%)", title="contrastive accuracy")
        elif name == "synthetic":
            _draw(ax, parsed, "synthetic_above_positive", "tab:red", "% above the positive")
            ax.set(ylabel="% of synthetic logits", title="synthetic negatives above the positive")
        elif name == "monitors":
            if _has(parsed["train"], "linear_acc1"):
                _draw(ax, parsed, "linear_acc1", "tab:blue", "online linear train top-1")
            if parsed["linear_val"]:
                _draw_top(ax, parsed["linear_val"], "online linear val", "tab:orange", "s", top5)
            if parsed["knn"]:
                _draw_top(ax, parsed["knn"], "k-NN", "tab:green", "^", top5)
            classes = f" ({parsed['num_classes']} classes)" if parsed["num_classes"] else ""
            ax.set(ylabel="accuracy (%)", title=f"monitors{classes}")
        elif name == "val":
            _draw_top(ax, parsed["val"], "val", "tab:orange", "o", top5)
            ax.set(ylabel="accuracy (%)", title=f"{parsed['dataset']} val")
        elif name == "proj_std":
            _draw(ax, parsed, "proj_std", "tab:purple", "epoch mean")
            if proj_dim:
                ax.axhline(1 / math.sqrt(proj_dim), ls="--", color="gray", label=f"1/sqrt({proj_dim})")
            ax.set(ylabel="std", title="std of the normalised projections (0: collapse)")
        else:
            ax.plot(*_steps(parsed["train"], "lr"), color="tab:blue")
            ax.set(ylabel="learning rate", title="learning rate")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if ax.get_legend_handles_labels()[1]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, fontsize="small")
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return fig


def plot_run(folder, out=None):
    """Draw the curves of the run in ``folder`` into ``out`` (default ``folder/curves.png``); returns its path.

    Raises ValueError when the folder has no log, the log no parsable line or config.json is not JSON.
    """
    log = os.path.join(folder, "log_rank0.txt")
    if not os.path.isfile(log):
        raise ValueError(f"{folder} has no log_rank0.txt: pass a run folder (<output>/<MODEL.NAME>/<tag>[/linear_*])")
    parsed = parse_log(log)
    if not panels(parsed):
        raise ValueError(f"{log} holds no 'Train: [...]' or 'EPOCH ... val' line to plot")
    span = synthetic_span(parsed, synthetic_epochs(folder)) if parsed["train"] else None
    title = os.path.join(*os.path.abspath(folder).split(os.sep)[-2:])  # <tag>/linear_*, <name>/<tag>
    fig = draw(parsed, title, span, projection_dim(folder))
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
