"""tools/plot_log.py on logs written in the exact formats of main_pretrain.py and main_linear.py."""

import datetime

import numpy as np
import pytest
from conftest import run_script
from PIL import Image

from tools.plot_log import main, parse_log

PREFIX = "[2025-01-01 12:00:00 synco__vit_tiny__t] ({} {}): INFO "
PANEL_WIDTH = 480  # pixels per panel


def pretrain_line(epoch, epochs, idx, num_steps, lr, loss, acc1, acc5):
    eta = datetime.timedelta(seconds=3 * (num_steps - idx - 1))
    return PREFIX.format("main_pretrain.py", 178) + (
        f"Train: [{epoch}/{epochs}][{idx}/{num_steps}]\t"
        f"eta {eta} (run 1 day, 2:03:04) lr {lr:.6f}\t"
        f"time 0.4140 (0.4140)\t"
        f"loss {loss:.4f} ({loss + 0.1:.4f})\t"
        f"grad_norm 116.8946 (116.8946)\t"
        f"mem 862MB\t"
        f"contrast_acc1 {acc1:.3f} ({acc1:.3f})\t"
        f"contrast_acc5 {acc5:.3f} ({acc5:.3f})"
    )


def linear_lines(epoch, epochs, num_steps, top1):
    lines = [
        PREFIX.format("main_linear.py", 179) + f"Train: [{epoch}/{epochs}][{idx}/{num_steps}]\t"
        f"eta 0:00:0{num_steps - idx - 1} lr {0.1 * (idx + 1) / num_steps:.6f}\t"
        f"time 0.0288 (0.0288)\tloss {2.0 - 0.1 * epoch - 0.01 * idx:.4f} (2.0000)\tmem 840MB"
        for idx in range(num_steps)
    ]
    lines.append(PREFIX.format("main_linear.py", 185) + f"EPOCH {epoch} training took 0:00:01")
    lines.append(
        PREFIX.format("main_linear.py", 279) + f"EPOCH {epoch} cifar10 val (10000 images): top-1 {top1:.2f}% "
        f"top-5 {top1 + 30:.2f}% loss {1.5 - 0.1 * epoch:.4f}; best top-1 {top1:.2f}%"
    )
    return lines


def write_pretrain_log(folder, with_acc=True, epochs=3, num_steps=8):
    lines = [PREFIX.format("main_pretrain.py", 312) + "start training"]
    for epoch in range(epochs):
        for idx in range(0, num_steps, 2):
            step = epoch * num_steps + idx
            acc = (min(90.0, 5.0 * step), min(99.0, 8.0 * step)) if with_acc else (0.0, 0.0)
            lines.append(pretrain_line(epoch, epochs, idx, num_steps, 1e-3 * step / 24, 9.0 - 0.2 * step, *acc))
        lines.append(
            PREFIX.format("main_pretrain.py", 190) + f"EPOCH {epoch} done in 0:00:01: mean loss 7.9835 "
            "contrast_acc1 0.000 images/s 13.3 (all processes)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log_rank0.txt").write_text("\n".join(lines) + "\n")
    return folder


def write_linear_log(folder, epochs=4, num_steps=5):
    lines = [PREFIX.format("main_linear.py", 230) + "loaded the encoder of checkpoint.pth (pretraining epoch 2)"]
    for epoch in range(epochs):
        lines += linear_lines(epoch, epochs, num_steps, 40.0 + 5 * epoch)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log_rank0.txt").write_text("\n".join(lines) + "\n")
    return folder


def check_png(path, panels):
    image = Image.open(path)
    assert image.format == "PNG"
    assert image.width == panels * PANEL_WIDTH and image.height > 300
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # not blank
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2


def test_parse_pretrain_log(tmp_path):
    folder = write_pretrain_log(tmp_path / "run")
    with open(folder / "log_rank0.txt", "a") as f:  # a resumed run repeats epoch 2 with other values
        f.write(pretrain_line(2, 3, 0, 8, 0.5, 1.25, 3.0, 4.0) + "\n")
    parsed = parse_log(folder / "log_rank0.txt")
    train = parsed["train"]
    assert list(train) == [e * 8 + i for e in range(3) for i in (0, 2, 4, 6)]  # epoch * N + i, sorted
    assert train[10]["loss"] == (pytest.approx(7.0), pytest.approx(7.1))
    assert train[10]["lr"] == (pytest.approx(1e-3 * 10 / 24, abs=1e-6), None)
    assert train[16]["loss"][0] == 1.25 and train[16]["contrast_acc1"] == (3.0, 3.0)
    assert parsed["val"] == {} and parsed["dataset"] is None


def test_parse_linear_log(tmp_path):
    parsed = parse_log(write_linear_log(tmp_path / "linear_cifar10_linprob") / "log_rank0.txt")
    assert len(parsed["train"]) == 4 * 5 and "contrast_acc1" not in parsed["train"][0]
    assert parsed["dataset"] == "cifar10"
    assert parsed["val"][3] == (55.0, 85.0, pytest.approx(1.2))


def test_pretrain_run_cli(tmp_path):
    folder = write_pretrain_log(tmp_path / "synco__vit_tiny__t" / "t")
    result = run_script(["tools/plot_log.py", str(folder)], timeout=120)
    assert result.returncode == 0, result.stderr
    png = folder / "curves.png"
    assert result.stdout.strip() == f"curves: {png}"
    check_png(png, panels=3)  # loss, contrastive accuracy, lr


def test_byol_run_has_no_accuracy_panel(tmp_path):
    folder = write_pretrain_log(tmp_path / "byol", with_acc=False)
    out = tmp_path / "byol.png"
    assert main([str(folder), "--out", str(out)]) == str(out)
    check_png(out, panels=2)  # loss, lr


def test_linear_run(tmp_path, capsys):
    folder = write_linear_log(tmp_path / "t" / "linear_cifar10_linprob")
    main([str(folder)])
    assert capsys.readouterr().out.strip() == f"curves: {folder / 'curves.png'}"
    check_png(folder / "curves.png", panels=3)  # loss, lr, val top-1/top-5


@pytest.mark.parametrize("log", [None, "", "[2025-01-01 12:00:00 x] (main_pretrain.py 1): INFO start training\n"])
def test_nothing_to_plot(tmp_path, capsys, log):
    if log is not None:
        (tmp_path / "log_rank0.txt").write_text(log)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "curves.png").exists()
