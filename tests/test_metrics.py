"""MetricWriter: scalars round-trip through TensorBoard event files; no-op when off or without tensorboard.
The contrastive metrics against values counted by hand, and as main_pretrain.py logs them."""

import logging
import re
import sys

import pytest
import torch
from conftest import read_scalars, small_config, views
from timm.utils import accuracy

from distributed import DistEnv
from engine import train_one_epoch
from logger import create_logger
from lr_scheduler import build_scheduler
from metrics import NULL_WRITER, DeviceMeters, MetricWriter, contrastive_metrics
from models import build_model
from monitor import Monitors, OnlineLinear
from optimizer import build_optimizer
from precision import OptimizerStep, amp_autocast
from tools.plot_log import parse_log

LOGGER = logging.getLogger("test_metrics")


def test_scalars_round_trip(tmp_path):
    with MetricWriter(tmp_path, enabled=True) as writer:
        assert writer.enabled
        for step in range(3):
            writer.scalars({"train/loss": 2.0 - step, "train/lr": torch.tensor(0.1 * step)}, step)
        writer.scalars({"top1": 55.5}, 2, prefix="val/")
    assert not writer.enabled
    writer.scalar("train/loss", 9.0, 3)  # after close: ignored
    writer.close()

    scalars = read_scalars(tmp_path)
    assert set(scalars) == {"train/loss", "train/lr", "val/top1"}
    assert scalars["train/loss"] == [(0, 2.0), (1, 1.0), (2, 0.0)]
    assert [s for s, _ in scalars["train/lr"]] == [0, 1, 2]
    assert scalars["train/lr"][2][1] == pytest.approx(0.2)
    assert scalars["val/top1"] == [(2, 55.5)]


def test_resume_purges_steps_of_the_interrupted_run(tmp_path):
    with MetricWriter(tmp_path, enabled=True) as writer:  # a run interrupted after step 5
        for step in range(6):
            writer.scalar("train/loss", 1.0, step)
    with MetricWriter(tmp_path, enabled=True, purge_step=4) as writer:  # resumed at step 4
        for step in range(4, 8):
            writer.scalar("train/loss", 2.0, step)
    assert read_scalars(tmp_path)["train/loss"] == [(s, 1.0) for s in range(4)] + [(s, 2.0) for s in range(4, 8)]


def test_disabled_writer_writes_nothing(tmp_path, caplog):
    folder = tmp_path / "run"
    with caplog.at_level(logging.INFO), MetricWriter(folder, enabled=False) as writer:
        writer.scalar("train/loss", 1.0, 0)
        writer.flush()
    assert not writer.enabled
    assert not folder.exists()
    assert not caplog.records
    assert not NULL_WRITER.enabled


def test_missing_tensorboard_is_a_no_op_with_one_log_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    logger = logging.getLogger("test_metrics")
    with caplog.at_level(logging.INFO, logger="test_metrics"):
        writer = MetricWriter(tmp_path, enabled=True, logger=logger)
        for step in range(3):
            writer.scalar("train/loss", 1.0, step)
        writer.close()
    assert not writer.enabled
    assert list(tmp_path.iterdir()) == []
    (record,) = caplog.records
    assert "tensorboard" in record.getMessage() and "\n" not in record.getMessage()


# -----------------------------------------------------------------------------
# Contrastive metrics
# -----------------------------------------------------------------------------

# positive (column 0), 4 queue logits, 5 synthetic logits; per row: queue and synthetic logits above the positive
HAND_LOGITS = torch.tensor(
    [
        [0.9, 0.1, 0.2, 0.3, 0.4, 0.95, 0.5, 0.1, 0.92, 0.0],  # queue 0, synthetic 2: rank 3 of all
        [0.5, 0.6, 0.1, 0.2, 0.3, 0.1, 0.1, 0.1, 0.1, 0.1],  # queue 1, synthetic 0: rank 2
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],  # queue 4, synthetic 5: rank 10
        [1.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],  # queue 0, synthetic 0: rank 1
    ]
)


def test_synco_metrics_counted_by_hand():
    values = contrastive_metrics(HAND_LOGITS, torch.zeros(4, dtype=torch.long), real_columns=5)
    assert {name: value.item() for name, value in values.items()} == pytest.approx(
        {
            "contrast_acc1": 100 * 1 / 4,  # rank 1: row 3
            "contrast_acc5": 100 * 3 / 4,  # rank <= 5: rows 0, 1, 3
            "contrast_acc1_real": 100 * 2 / 4,  # among the positive and the queue, rank 1: rows 0, 3
            "contrast_acc5_real": 100 * 4 / 4,  # 5 columns: always
            "synthetic_above_positive": 100 * (2 + 0 + 5 + 0) / 20,
        }
    )


@pytest.mark.parametrize("k", [0, 1, 4, 6])
def test_share_of_synthetic_logits_above_the_positive(k):
    """k of 6 synthetic logits above the positive in every row, whatever the queue holds."""
    n, rows = 6, 3
    positive = torch.randn(rows, 1)
    queue = positive + torch.randn(rows, 8)
    synthetic = positive + torch.cat([torch.rand(rows, k) + 0.1, -torch.rand(rows, n - k) - 0.1], dim=1)
    synthetic = synthetic[:, torch.randperm(n)]
    values = contrastive_metrics(torch.cat([positive, queue, synthetic], 1), torch.zeros(rows, dtype=torch.long), 9)
    assert values["synthetic_above_positive"].item() == pytest.approx(100 * k / n)


def test_synco_before_its_synthetic_negatives_scores_its_queue_alone():
    logits, labels = torch.randn(16, 1 + 32), torch.zeros(16, dtype=torch.long)
    values = contrastive_metrics(logits, labels, real_columns=1 + 32)
    assert "synthetic_above_positive" not in values
    assert values["contrast_acc1_real"] == values["contrast_acc1"]
    assert values["contrast_acc5_real"] == values["contrast_acc5"]


def test_moby_metrics_are_the_accuracies_it_always_logged():
    logits, labels = torch.randn(64, 1 + 32), torch.zeros(64, dtype=torch.long)
    logits[::3, 0] += 3  # some positives on top
    values = contrastive_metrics(logits, labels)
    assert set(values) == {"contrast_acc1", "contrast_acc5"}
    assert [values["contrast_acc1"], values["contrast_acc5"]] == accuracy(logits, labels, topk=(1, 5))
    assert 0 < values["contrast_acc1"] < values["contrast_acc5"] < 100


def test_contrastive_metrics_read_no_value():
    """They run on meta tensors, which have shapes but no values: nothing waits for the device."""
    logits, labels = torch.randn(8, 1 + 16 + 12, device="meta"), torch.zeros(8, dtype=torch.long, device="meta")
    values = contrastive_metrics(logits, labels, real_columns=1 + 16)
    assert len(values) == 5 and all(v.device.type == "meta" and v.shape == () for v in values.values())


def train_epochs(model_type, folder, epochs, steps=2, monitors=None, **opts):
    """Train ``epochs`` epochs of ``steps`` steps in this process, logging every step into ``folder``
    (log_rank0.txt and TensorBoard). Returns the last epoch's meters."""
    config = small_config(model_type, PRINT_FREQ=1, DATA__BATCH_SIZE=4, TRAIN__WARMUP_EPOCHS=0, **opts)
    model = build_model(config, steps_per_epoch=steps)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, steps)
    cpu = torch.device("cpu")
    logger = create_logger(str(folder), 0, f"metrics_{model_type}")
    with MetricWriter(str(folder), enabled=True) as writer:
        for epoch in range(epochs):
            meters = DeviceMeters()
            batches = [(*views(seed=epoch * steps + i), torch.tensor([0, 1, 2, 0])) for i in range(steps)]
            step = OptimizerStep(optimizer, model.parameters(), torch.amp.GradScaler("cpu", enabled=False))
            train_one_epoch(config, model, batches, step, scheduler, amp_autocast(config, cpu), epoch, logger, writer,
                            meters=meters, monitors=monitors)  # fmt: skip
    return meters


def test_moby_logs_what_it_logged_before(tmp_path):
    meters = train_epochs("moby", tmp_path, epochs=1)
    assert set(meters.read()) == {"loss", "grad_norm", "contrast_acc1", "contrast_acc5", "proj_std"}
    log = (tmp_path / "log_rank0.txt").read_text()
    lines = re.findall(r"Train: .*", log)
    assert len(lines) == 2
    for line in lines:
        assert re.fullmatch(r".*\tcontrast_acc1 [\d.]+ \([\d.]+\)\tcontrast_acc5 [\d.]+ \([\d.]+\)"
                            r"\tproj_std [\d.]+ \([\d.]+\)\tmem \d+MB", line)  # fmt: skip
    assert re.search(r"mean loss [\d.]+ contrast_acc1 [\d.]+ proj_std [\d.]+ images/s", log)
    assert not {"train/contrast_acc1_real", "train/synthetic_above_positive"} & set(read_scalars(tmp_path))


def test_synco_logs_its_real_queue_accuracy_and_synthetic_share(tmp_path):
    """Synthetic negatives in epoch 1 only: the step lines, epoch lines and scalars say so."""
    train_epochs("synco", tmp_path, epochs=3, MODEL__SYNTHETIC_START_EPOCH=1, MODEL__SYNTHETIC_END_EPOCH=1)
    log = (tmp_path / "log_rank0.txt").read_text()
    train = parse_log(tmp_path / "log_rank0.txt")["train"]
    assert list(train) == [step / 2 for step in range(6)]  # in epochs: 2 steps each
    for epoch, values in train.items():
        on = int(epoch) == 1
        assert ("synthetic_above_positive" in values) == on
        for k in (1, 5):
            real, everything = values[f"contrast_acc{k}_real"], values[f"contrast_acc{k}"]
            if on:  # the synthetic logits can only push the positive down
                assert real[0] >= everything[0] and real[1] >= everything[1]
            else:
                assert real == everything
        if on:
            assert 0 <= values["synthetic_above_positive"][0] <= 100
    epoch_lines = re.findall(r"EPOCH (\d) done in \S+: mean loss [\d.]+ contrast_acc1 ([\d.]+) (.*)images/s", log)
    assert [(e, rest.split()[0::2]) for e, _, rest in epoch_lines] == [
        ("0", ["contrast_acc1_real", "proj_std"]),
        ("1", ["contrast_acc1_real", "synthetic_above_positive", "proj_std"]),
        ("2", ["contrast_acc1_real", "proj_std"]),
    ]
    assert epoch_lines[1][2].split()[3] == f"{train[1.5]['synthetic_above_positive'][1]:.3f}"  # the epoch's mean
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["train/contrast_acc1_real"]] == list(range(6))
    assert [s for s, _ in scalars["train/contrast_acc5_real"]] == list(range(6))
    synthetic = scalars["train/synthetic_above_positive"]
    assert [s for s, _ in synthetic] == [2, 3]
    assert synthetic[0][1] == pytest.approx(train[1.0]["synthetic_above_positive"][0], abs=1e-3)


def test_byol_logs_a_batch_accuracy_and_the_monitor_its_train_accuracy(tmp_path):
    """BYOL has no contrastive accuracy: batch_acc1 (its own image's key among the batch's) in its
    place, a percentage; the online linear classifier's running top-1 beside it."""
    config = small_config("byol")
    linear = OnlineLinear(build_model(config).encoder.num_features, 3, 0.1, DistEnv(), seed=0)
    meters = train_epochs("byol", tmp_path, epochs=1, monitors=Monitors(config, LOGGER, 3, linear=linear))
    read = meters.read()
    assert set(read) == {"loss", "grad_norm", "batch_acc1", "proj_std", "linear_acc1"}
    for name in ("batch_acc1", "linear_acc1"):
        assert 0 <= read[name][0] <= 100 and read[name][0] * 8 % 100 == pytest.approx(0, abs=1e-3)  # k / 8 of 2 x 4
    assert 0 < read["proj_std"][0] <= 1
    log = (tmp_path / "log_rank0.txt").read_text()
    assert re.search(r"mean loss [\d.]+ batch_acc1 [\d.]+ linear_acc1 [\d.]+ proj_std [\d.]+ images/s", log)
    assert "nan" not in log
    assert {"train/batch_acc1", "train/linear_acc1", "epoch/batch_acc1", "epoch/linear_acc1"} <= set(
        read_scalars(tmp_path)
    )
