"""Training curves of a run, drawn from its own ``log_rank0.txt`` into a PNG.

    python tools/plot_log.py output/<MODEL.NAME>/<tag> [--out curves.png]
    python tools/plot_log.py output/<MODEL.NAME>/<tag>/linear_<dataset>_<kind>

Panels: training loss, contrastive top-1/top-5 (MoBY, SynCo) and learning rate
against the global step (epoch * steps per epoch + step), and for a linear
evaluation the validation top-1/top-5 against the epoch. A resumed run's repeated
steps keep their last value. Without a parsable line: one error line, exit 2.
"""

import argparse
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


FIELDS = {name: _field(name) for name in ("lr", "loss", "grad_norm", "contrast_acc1", "contrast_acc5")}


def parse_log(path):
    """{"train": {step: {field: (value, average)}}, "val": {epoch: (top1, top5, loss)}, "dataset": str or None}."""
    train, val, dataset = {}, {}, None
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
            elif m := VAL_RE.search(line):
                val[int(m[1])] = (float(m[4]), float(m[5]), float(m[6]))
                dataset = m[2]
    return {"train": dict(sorted(train.items())), "val": dict(sorted(val.items())), "dataset": dataset}


def _series(train, name, which=0):
    points = [(step, v[name][which]) for step, v in train.items() if name in v and v[name][which] is not None]
    return [s for s, _ in points], [y for _, y in points]


def plot_run(folder, out=None):
    """Draw the curves of the run in ``folder`` into ``out`` (default ``folder/curves.png``); returns its path.

    Raises ValueError when the folder has no log or the log no parsable line.
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

    # contrast_acc* are logged as 0 when a framework has none (BYOL)
    has_acc = any(v[n][0] or v[n][1] for v in train.values() for n in ("contrast_acc1", "contrast_acc5") if n in v)
    panels = [p for p, shown in (("loss", train), ("acc", has_acc), ("lr", train), ("val", val)) if shown]
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
        if panel == "loss":
            ax.plot(*_series(train, "loss"), alpha=0.4, label="batch")
            ax.plot(*_series(train, "loss", 1), label="epoch mean so far")
            ax.set(ylabel="loss", title="training loss")
            ax.legend()
        elif panel == "acc":
            for name in ("contrast_acc1", "contrast_acc5"):
                ax.plot(*_series(train, name), label=name.replace("contrast_acc", "top-"))
            ax.set(ylabel="accuracy (%)", title="contrastive accuracy (batch)")
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
