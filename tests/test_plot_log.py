"""tools/plot_log.py on logs written in the exact formats of main_pretrain.py and main_linear.py."""

import datetime
import json
import math

import numpy as np
import pytest
from conftest import run_script
from PIL import Image

from tools.plot_log import FIGURE_WIDTH, draw, main, panels, parse_log, synthetic_epochs, synthetic_span

PREFIX = "[2025-01-01 12:00:00 synco__vit_tiny__t] ({} {}): INFO "
PRINT_FREQ = 2
ALL_MONITOR_LINES = ("steps", "linear", "knn")


def logged_steps(num_steps):
    """The steps MetricLogger logs: every PRINT_FREQ-th and the epoch's last."""
    return [idx for idx in range(num_steps) if idx % PRINT_FREQ == 0 or idx + 1 == num_steps]


def pretrain_line(epoch, epochs, idx, num_steps, lr, loss, acc1, acc5, synco=(), extra=()):
    """main_pretrain.py's line; ``synco``: SynCo's (name, value) pairs, logged after contrast_acc5;
    ``extra``: further (name, value, epoch mean, format) fields (the monitors', BYOL's batch_acc1)."""
    eta = datetime.timedelta(seconds=3 * (num_steps - idx - 1))
    return (
        PREFIX.format("main_pretrain.py", 178)
        + (
            f"Train: [{epoch}/{epochs}][{idx}/{num_steps}]\t"
            f"eta {eta} (run 1 day, 2:03:04) lr {lr:.6f}\t"
            f"time 0.4140 (0.4140)\t"
            f"loss {loss:.4f} ({loss + 0.1:.4f})\t"
            f"grad_norm 116.8946 (116.8946)\t"
            f"mem 862MB\t"
            f"contrast_acc1 {acc1:.3f} ({acc1:.3f})\t"
            f"contrast_acc5 {acc5:.3f} ({acc5:.3f})"
        )
        + "".join(f"\t{name} {value:.3f} ({value - 1:.3f})" for name, value in synco)
        + "".join(f"\t{name} {value:{fmt}} ({mean:{fmt}})" for name, value, mean, fmt in extra)
    )


def epoch_loss(epoch):
    """The mean loss of a written pretraining log's epoch line (not any step's running mean)."""
    return 8.5 - epoch


def linear_monitor(epoch, classes):
    """Top-1 and top-5 of the online linear classifier's val line after ``epoch``."""
    return 20.0 + 10 * epoch, 100.0 if classes <= 5 else 50.0 + 10 * epoch


def knn_monitor(epoch, classes):
    return 25.0 + 10 * epoch, 100.0 if classes <= 5 else 65.0 + 10 * epoch


def write_pretrain_log(folder, with_acc=True, epochs=3, num_steps=8, synthetic_epochs=None, byol_acc=0.0,
                       batch_acc=False, monitors=None, monitor_lines=ALL_MONITOR_LINES):  # fmt: skip
    """A run's log: MoBY's lines, or with ``synthetic_epochs`` (first, last) SynCo's; BYOL's without
    accuracy (``batch_acc``: with its top-1 among the batch). ``monitors``: the number of classes of
    the monitors' start line, or "off"; ``monitor_lines``: which of their lines the run logs (their
    step fields, the online linear val line after every epoch, the k-NN line after every second)."""
    lines = [PREFIX.format("main_pretrain.py", 312) + "start training"]
    if monitors == "off":
        lines.append(PREFIX.format("main_pretrain.py", 300) + "monitors off: the dataset has no labels")
    elif monitors is not None:
        start = f"monitors: {monitors} classes; online linear on, k-NN every 2 epochs"
        lines.append(PREFIX.format("main_pretrain.py", 300) + start)
    on = monitors not in (None, "off")
    for epoch in range(epochs):
        for idx in logged_steps(num_steps):
            step = epoch * num_steps + idx
            acc = (min(90.0, 5.0 * step), min(99.0, 8.0 * step)) if with_acc else (byol_acc, byol_acc)
            synco = []
            if synthetic_epochs is not None:
                active = synthetic_epochs[0] <= epoch <= synthetic_epochs[1]
                synco = [("contrast_acc1_real", acc[0]), ("contrast_acc5_real", acc[1])]
                acc = (acc[0] / 2, acc[1] / 2) if active else acc  # the synthetic logits push the positive down
                synco += [("synthetic_above_positive", 10.0 - step / 4)] if active else []
            extra = []
            if batch_acc:
                extra.append(("batch_acc1", 30.0 + step, 29.0 + step, ".3f"))
            if on and "steps" in monitor_lines:
                extra.append(("linear_acc1", 10.0 + 2 * step, 9.0 + 2 * step, ".3f"))
                extra.append(("proj_std", 0.05 + 0.001 * step, 0.0495 + 0.001 * step, ".4f"))
            lr = 1e-3 * step / 24
            line = pretrain_line(epoch, epochs, idx, num_steps, lr, 9.0 - 0.2 * step, *acc, synco=synco, extra=extra)
            lines.append(line)
        lines.append(
            PREFIX.format("main_pretrain.py", 190) + f"EPOCH {epoch} done in 0:00:01: mean loss "
            f"{epoch_loss(epoch):.4f} contrast_acc1 0.000 images/s 13.3 (all processes)"
        )
        if on and "linear" in monitor_lines:
            top1, top5 = linear_monitor(epoch, monitors)
            lines.append(
                PREFIX.format("main_pretrain.py", 201)
                + f"EPOCH {epoch} online linear val (500 images): top-1 {top1:.2f}% top-5 {top5:.2f}%"
            )
        if on and "knn" in monitor_lines and epoch % 2 == 1:
            top1, top5 = knn_monitor(epoch, monitors)
            lines.append(
                PREFIX.format("main_pretrain.py", 215) + f"EPOCH {epoch} k-NN val (k=20, T=0.07, bank 1000 images, "
                f"500 val): top-1 {top1:.2f}% top-5 {top5:.2f}% in 12.3s"
            )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log_rank0.txt").write_text("\n".join(lines) + "\n")
    return folder


def linear_loss(epoch, idx):
    return 2.0 - 0.1 * epoch - 0.01 * idx


def linear_lines(epoch, epochs, num_steps, top1, classes):
    """main_linear.py's lines of an epoch: each step's with the epoch's running mean loss, then its val line."""
    lines = []
    for idx in range(num_steps):
        mean = np.mean([linear_loss(epoch, i) for i in range(idx + 1)])
        lines.append(
            PREFIX.format("main_linear.py", 179) + f"Train: [{epoch}/{epochs}][{idx}/{num_steps}]\t"
            f"eta 0:00:0{num_steps - idx - 1} lr {0.1 * (idx + 1) / num_steps:.6f}\t"
            f"time 0.0288 (0.0288)\tloss {linear_loss(epoch, idx):.4f} ({mean:.4f})\tmem 840MB"
        )
    lines.append(PREFIX.format("main_linear.py", 185) + f"EPOCH {epoch} training took 0:00:01")
    top5 = 100.0 if classes <= 5 else top1 + 30
    lines.append(
        PREFIX.format("main_linear.py", 279) + f"EPOCH {epoch} cifar10 val (10000 images): top-1 {top1:.2f}% "
        f"top-5 {top5:.2f}% loss {1.5 - 0.1 * epoch:.4f}; best top-1 {top1:.2f}%"
    )
    return lines


def write_linear_log(folder, epochs=4, num_steps=5, classes=10):
    lines = [
        PREFIX.format("main_linear.py", 156) + f"cifar10: 50000 train / 10000 val images, {classes} classes",
        PREFIX.format("main_linear.py", 230) + "loaded the encoder of checkpoint.pth (pretraining epoch 2)",
    ]
    for epoch in range(epochs):
        lines += linear_lines(epoch, epochs, num_steps, 40.0 + 5 * epoch, classes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log_rank0.txt").write_text("\n".join(lines) + "\n")
    return folder


def write_config(folder, model_type="synco", **keys):
    """A run's config.json with the MODEL keys ``keys``."""
    (folder / "config.json").write_text(json.dumps({"MODEL": {"TYPE": model_type, **keys}, "TRAIN": {"EPOCHS": 3}}))


def check_png(path):
    image = Image.open(path)
    assert image.format == "PNG"
    assert image.width == FIGURE_WIDTH * 100 and image.height > 300
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # not blank
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2


def figure_of(folder, **kwargs):
    """The parsed log of ``folder`` and its figure's axes by panel name."""
    parsed = parse_log(folder / "log_rank0.txt")
    fig = draw(parsed, "run", **kwargs)
    assert len(fig.axes) == len(panels(parsed))
    return parsed, fig, dict(zip(panels(parsed), fig.axes))


def lines_of(ax):
    """{label: (x, y)} of the labelled lines of ``ax``."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines() if not line.get_label().startswith("_")}  # fmt: skip


# ---------------------------------------------------------------------------- parsing


def test_parse_pretrain_log(tmp_path):
    folder = write_pretrain_log(tmp_path / "run")
    with open(folder / "log_rank0.txt", "a") as f:  # a resumed run repeats epoch 2 with other values
        f.write(pretrain_line(2, 3, 0, 8, 0.5, 1.25, 3.0, 4.0) + "\n")
    parsed = parse_log(folder / "log_rank0.txt")
    train = parsed["train"]
    assert list(train) == [e + i / 8 for e in range(3) for i in (0, 2, 4, 6, 7)]  # epoch + step / steps, sorted
    assert train[1 + 2 / 8]["loss"] == (pytest.approx(7.0), pytest.approx(7.1))
    assert train[1 + 2 / 8]["lr"] == (pytest.approx(1e-3 * 10 / 24, abs=1e-6), None)
    assert train[2.0]["loss"][0] == 1.25 and train[2.0]["contrast_acc1"] == (3.0, 3.0)
    assert parsed["val"] == {} and parsed["dataset"] is None and parsed["num_classes"] is None
    assert parsed["linear_val"] == {} and parsed["knn"] == {}


def test_epoch_means_are_the_epoch_lines_and_last_steps(tmp_path):
    parsed = parse_log(write_pretrain_log(tmp_path / "run") / "log_rank0.txt")
    means = parsed["epoch_means"]
    assert list(means) == [0, 1, 2]
    for epoch in range(3):
        last = parsed["train"][epoch + 7 / 8]
        assert means[epoch]["loss"] == epoch_loss(epoch) != last["loss"][1]  # the epoch line's, over all processes
        assert means[epoch]["contrast_acc1"] == last["contrast_acc1"][1]
        assert means[epoch]["grad_norm"] == last["grad_norm"][1] and "lr" not in means[epoch]


def test_an_unfinished_epoch_has_no_mean(tmp_path):
    folder = write_pretrain_log(tmp_path / "run", epochs=2)
    with open(folder / "log_rank0.txt", "a") as f:  # stopped inside epoch 2
        f.write("\n".join(pretrain_line(2, 3, idx, 8, 0.1, 5.0, 1.0, 2.0) for idx in (0, 2)) + "\n")
    parsed = parse_log(folder / "log_rank0.txt")
    assert list(parsed["epoch_means"]) == [0, 1] and max(parsed["train"]) == 2 + 2 / 8


def test_before_an_epoch_ends_the_steps_carry_the_legend(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "log_rank0.txt").write_text("\n".join(pretrain_line(0, 3, idx, 8, 0.1, 5.0, 1.0, 2.0) for idx in (0, 2)))
    _, _, axes = figure_of(folder)
    assert lines_of(axes["contrast"]) == {"top-1": ([0, 2 / 8], [1.0, 1.0]), "top-5": ([0, 2 / 8], [2.0, 2.0])}


def test_parse_linear_log(tmp_path):
    parsed = parse_log(write_linear_log(tmp_path / "linear_cifar10_linprob") / "log_rank0.txt")
    assert len(parsed["train"]) == 4 * 5 and "contrast_acc1" not in parsed["train"][0]
    assert parsed["dataset"] == "cifar10" and parsed["num_classes"] == 10
    assert parsed["val"][3] == (55.0, 85.0, pytest.approx(1.2))
    # without an epoch line, the loss's epoch mean is the last step's running mean: the whole epoch's
    for epoch in range(4):
        whole = np.mean([linear_loss(epoch, i) for i in range(5)])
        assert parsed["epoch_means"][epoch]["loss"] == pytest.approx(whole, abs=1e-4)


def test_parse_monitor_lines(tmp_path):
    parsed = parse_log(write_pretrain_log(tmp_path / "run", epochs=4, monitors=10) / "log_rank0.txt")
    assert parsed["num_classes"] == 10
    step = parsed["train"][1 + 2 / 8]  # global step 10
    assert step["linear_acc1"] == (30.0, 29.0)
    assert step["proj_std"] == (pytest.approx(0.06), pytest.approx(0.0595))
    assert parsed["epoch_means"][1]["proj_std"] == pytest.approx(0.0495 + 0.001 * 15)  # its last step's mean
    assert parsed["linear_val"] == {e: linear_monitor(e, 10) for e in range(4)}
    assert parsed["knn"] == {e: knn_monitor(e, 10) for e in (1, 3)}
    assert parsed["val"] == {}  # neither monitor line is a linear evaluation's


def test_parse_the_initial_encoders_knn(tmp_path):
    """Logged before the first step, it is the curve's point at epoch 0 (key -1: after "epoch -1")."""
    log = write_pretrain_log(tmp_path / "run", epochs=2, monitors=10) / "log_rank0.txt"
    lines = log.read_text().splitlines(keepends=True)
    before = (PREFIX.format("main_pretrain.py", 199) + "EPOCH -1 (before training) k-NN val (k=20, T=0.07, bank "
              "1000 images, 500 val): top-1 11.00% top-5 50.00% in 0.1s\n")  # fmt: skip
    log.write_text("".join(lines[:2] + [before] + lines[2:]))
    parsed = parse_log(log)
    assert parsed["knn"] == {-1: (11.0, 50.0), 1: knn_monitor(1, 10)}
    assert list(parsed["knn"]) == [-1, 1]


def test_parse_byol_batch_accuracy(tmp_path):
    parsed = parse_log(write_pretrain_log(tmp_path / "byol", with_acc=False, byol_acc=math.nan, batch_acc=True)
                       / "log_rank0.txt")  # fmt: skip
    assert parsed["train"][1 + 2 / 8]["batch_acc1"] == (40.0, 39.0)
    assert parsed["epoch_means"][2]["batch_acc1"] == 29.0 + 23
    assert "contrast" in panels(parsed)


@pytest.mark.parametrize("line", ["monitors: 3 classes; online linear on, k-NN off",
                                  "cifar10: 50000 train / 10000 val images, 3 classes"])  # fmt: skip
def test_parse_number_of_classes(tmp_path, line):
    (tmp_path / "log_rank0.txt").write_text(PREFIX.format("main.py", 1) + line + "\n")
    assert parse_log(tmp_path / "log_rank0.txt")["num_classes"] == 3


# ---------------------------------------------------------------------------- panels


def test_x_axis_in_epochs(tmp_path):
    parsed, fig, axes = figure_of(write_pretrain_log(tmp_path / "run", monitors=10))
    expected = [e + i / 8 for e in range(3) for i in logged_steps(8)]
    thin = [line for line in axes["loss"].get_lines() if line.get_label() == "logged steps"][0]
    assert list(thin.get_xdata()) == expected
    assert list(axes["lr"].get_lines()[0].get_xdata()) == expected
    assert all(ax.get_shared_x_axes().joined(ax, axes["loss"]) for ax in fig.axes)
    assert fig.axes[-1].get_xlabel() == "epoch"


def test_epoch_means_drawn_at_epoch_ends(tmp_path):
    parsed, _, axes = figure_of(write_pretrain_log(tmp_path / "run", monitors=10))
    assert lines_of(axes["loss"])["epoch mean"] == ([1, 2, 3], [epoch_loss(e) for e in range(3)])
    mean = lines_of(axes["contrast"])["top-1"]
    assert mean == ([1, 2, 3], [parsed["train"][e + 7 / 8]["contrast_acc1"][1] for e in range(3)])
    assert axes["contrast"].get_lines()[0].get_marker() in ("None", "")  # the steps: a plain thin line
    monitor = lines_of(axes["monitors"])
    assert monitor["online linear train top-1"][0] == [1, 2, 3]
    assert monitor["online linear val top-1"] == ([1, 2, 3], [linear_monitor(e, 10)[0] for e in range(3)])
    assert monitor["k-NN top-1"] == ([2], [knn_monitor(1, 10)[0]])


def test_linear_run_val_after_each_epoch(tmp_path):
    parsed, _, axes = figure_of(write_linear_log(tmp_path / "linear_cifar10_linprob"))
    assert panels(parsed) == ["loss", "val", "lr"]
    val = lines_of(axes["val"])
    assert val["val top-1"] == ([1, 2, 3, 4], [40.0 + 5 * e for e in range(4)])
    assert val["val top-5"][1] == [70.0 + 5 * e for e in range(4)]


@pytest.mark.parametrize(
    "monitors, monitor_lines, shown",
    [(None, ALL_MONITOR_LINES, False), ("off", ALL_MONITOR_LINES, False), (10, (), False),
     (10, ("steps",), True), (10, ("linear",), True), (10, ("knn",), True)],
)  # fmt: skip
def test_monitor_panel_only_with_monitor_lines(tmp_path, monitors, monitor_lines, shown):
    folder = write_pretrain_log(tmp_path / "run", monitors=monitors, monitor_lines=monitor_lines)
    parsed, _, axes = figure_of(folder)
    assert ("monitors" in axes) == shown
    assert ("proj_std" in axes) == ("steps" in monitor_lines and monitors == 10)
    if shown:  # what its legend names has points
        named = lines_of(axes["monitors"])
        assert named and all(x for x, _ in named.values())
        assert ("online linear train top-1" in named) == ("steps" in monitor_lines)


@pytest.mark.parametrize("classes", [2, 5, 10])
def test_top5_dropped_with_five_classes_or_fewer(tmp_path, classes):
    trivial = classes <= 5
    _, _, axes = figure_of(write_pretrain_log(tmp_path / "run", epochs=4, monitors=classes))
    labels = set(lines_of(axes["monitors"]))
    assert {"online linear val top-1", "k-NN top-1"} <= labels
    assert ({"online linear val top-5", "k-NN top-5"} <= labels) != trivial
    assert not trivial or not any("top-5" in label for label in labels)
    assert "top-5" in lines_of(axes["contrast"])  # over the queue: kept
    _, _, axes = figure_of(write_linear_log(tmp_path / "linear", classes=classes))
    assert ("val top-5" in lines_of(axes["val"])) != trivial


def test_legends_outside_the_axes(tmp_path):
    folder = write_pretrain_log(tmp_path / "run", epochs=4, synthetic_epochs=(1, 2), monitors=10)
    parsed = parse_log(folder / "log_rank0.txt")
    _, fig, axes = figure_of(folder, span=synthetic_span(parsed, (1, 2)), proj_dim=64)
    fig.draw_without_rendering()  # lays the figure out
    figure_box = fig.bbox
    for name, ax in axes.items():
        legend = ax.get_legend()
        if name == "lr":
            assert legend is None  # one curve; the shaded epochs are named in the first panel's legend
            continue
        assert legend is not None, name
        box, frame = legend.get_window_extent(), ax.get_window_extent()
        assert box.x0 >= frame.x1 and not box.overlaps(frame), name  # to the axes' right
        assert box.x1 <= figure_box.x1 and box.y0 >= figure_box.y0, name  # in the picture


def test_projection_std_reference_line(tmp_path):
    folder = write_pretrain_log(tmp_path / "run", monitors=10)
    _, _, axes = figure_of(folder, proj_dim=64)
    assert lines_of(axes["proj_std"])["1/sqrt(64)"][1] == [1 / 8, 1 / 8]
    _, _, axes = figure_of(folder)  # D unknown
    assert set(lines_of(axes["proj_std"])) == {"epoch mean"}


def test_projection_dim_from_config(tmp_path):
    folder = write_pretrain_log(tmp_path / "moby" / "t", monitors=10)
    write_config(folder, model_type="moby", PROJ_DIM=64)
    main([str(folder)])
    check_png(folder / "curves.png")


# ---------------------------------------------------------------------------- whole runs


@pytest.mark.slow
def test_pretrain_run_cli(tmp_path):
    folder = write_pretrain_log(tmp_path / "synco__vit_tiny__t" / "t")
    result = run_script(["tools/plot_log.py", str(folder)], timeout=120)
    assert result.returncode == 0, result.stderr
    png = folder / "curves.png"
    assert result.stdout.strip() == f"curves: {png}"
    check_png(png)


@pytest.mark.parametrize("logged", [float("nan"), 0.0])  # what main_pretrain.py logs for BYOL, and older runs
def test_byol_run_has_no_accuracy_panel(tmp_path, logged):
    folder = write_pretrain_log(tmp_path / "byol", with_acc=False, byol_acc=logged)
    assert panels(parse_log(folder / "log_rank0.txt")) == ["loss", "lr"]
    out = tmp_path / "byol.png"
    assert main([str(folder), "--out", str(out)]) == str(out)
    check_png(out)


def test_parse_synco_log(tmp_path):
    parsed = parse_log(write_pretrain_log(tmp_path / "run", synthetic_epochs=(1, 1)) / "log_rank0.txt")
    train = parsed["train"]
    assert parsed["pretraining"]
    x = 1 + 2 / 8  # global step 10
    assert train[x]["contrast_acc1_real"] == (50.0, 49.0) and train[x]["contrast_acc1"] == (25.0, 25.0)
    assert train[x]["contrast_acc5_real"] == (80.0, 79.0) and train[x]["contrast_acc5"] == (40.0, 40.0)
    assert train[0.5]["contrast_acc1_real"][0] == train[0.5]["contrast_acc1"][0] == 20.0
    assert train[x]["synthetic_above_positive"] == (7.5, 6.5)
    assert [s for s, v in train.items() if "synthetic_above_positive" in v] == [1 + i / 8 for i in logged_steps(8)]
    assert all("contrast_acc1_real" in v for v in train.values())


# the window's names in config.json: the current ones, and the original's, which are still accepted
@pytest.mark.parametrize("first, last", [("SYNTHETIC_START_EPOCH", "SYNTHETIC_END_EPOCH"),
                                         ("WARMUP_EPOCHS", "COOLDOWN_EPOCHS")])  # fmt: skip
def test_synthetic_epochs_from_config(tmp_path, first, last):
    write_config(tmp_path, **{first: 1, last: 7})
    assert synthetic_epochs(tmp_path) == (1, 7)


def test_no_synthetic_epochs_without_synco(tmp_path):
    assert synthetic_epochs(tmp_path) is None  # no config.json (a run of older code)
    write_config(tmp_path, model_type="moby", WARMUP_EPOCHS=1, COOLDOWN_EPOCHS=7)
    assert synthetic_epochs(tmp_path) is None


def test_synthetic_span_in_epochs(tmp_path):
    parsed = parse_log(write_pretrain_log(tmp_path / "run", synthetic_epochs=(1, 1)) / "log_rank0.txt")
    # 3 finished epochs
    assert synthetic_span(parsed, (1, 1)) == (1, 2)
    assert synthetic_span(parsed, (2, 100)) == (2, 3)  # clipped to what the log holds
    assert synthetic_span(parsed, (0, 0)) == (0, 1)
    assert synthetic_span(parsed, (30, 100)) is None  # not reached yet
    assert synthetic_span(parsed, None) is None
    with open(tmp_path / "run" / "log_rank0.txt", "a") as f:  # stopped inside epoch 3
        f.write(pretrain_line(3, 4, 2, 8, 0.1, 5.0, 1.0, 2.0) + "\n")
    assert synthetic_span(parse_log(tmp_path / "run" / "log_rank0.txt"), (2, 100)) == (2, 3 + 2 / 8)
    # a linear evaluation's folder keeps the pretraining's config.json, but not its epochs
    linear = parse_log(write_linear_log(tmp_path / "linear_cifar10_linprob") / "log_rank0.txt")
    assert not linear["pretraining"] and synthetic_span(linear, (0, 3)) is None


def shaded_pixels(path):
    """Pixels of the span's tint: gold (255, 215, 0) at alpha 0.15 over white."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(pixels - [255, 250, 217]).max(axis=2) <= 2).sum())


@pytest.mark.parametrize("first, last", [("SYNTHETIC_START_EPOCH", "SYNTHETIC_END_EPOCH"),
                                         ("WARMUP_EPOCHS", "COOLDOWN_EPOCHS")])  # fmt: skip
def test_synco_run_plot_shades_synthetic_epochs(tmp_path, first, last):
    folder = write_pretrain_log(tmp_path / "synco__vit_tiny__t" / "t", synthetic_epochs=(1, 1))
    # loss, contrastive accuracy (all and real queue), synthetic above positive, lr
    assert panels(parse_log(folder / "log_rank0.txt")) == ["loss", "contrast", "synthetic", "lr"]
    plain = main([str(folder), "--out", str(tmp_path / "plain.png")])
    check_png(plain)
    write_config(folder, **{first: 1, last: 1})
    check_png(main([str(folder)]))
    # four panels, each shaded over a third of its width, 500 px or more, and 120 px or more high
    # (without the span: a few antialiased pixels)
    assert shaded_pixels(plain) < 500 < 4 * 0.2 * 500 * 120 < shaded_pixels(folder / "curves.png")


def test_unreadable_config_is_one_error_line(tmp_path, capsys):
    folder = write_pretrain_log(tmp_path / "run", synthetic_epochs=(1, 1))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json" in err and err.count("\n") == 1


def test_linear_run(tmp_path, capsys):
    folder = write_linear_log(tmp_path / "t" / "linear_cifar10_linprob")
    main([str(folder)])
    assert capsys.readouterr().out.strip() == f"curves: {folder / 'curves.png'}"
    check_png(folder / "curves.png")


@pytest.mark.parametrize("log", [None, "", "start training", "monitors: 10 classes; online linear on, k-NN off"])
def test_nothing_to_plot(tmp_path, capsys, log):
    if log is not None:
        (tmp_path / "log_rank0.txt").write_text(PREFIX.format("main_pretrain.py", 1) + log + "\n" if log else "")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "curves.png").exists()
