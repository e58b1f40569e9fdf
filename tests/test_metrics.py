"""MetricWriter: scalars round-trip through TensorBoard event files; no-op when off or without tensorboard."""

import logging
import sys

import pytest
import torch

from metrics import NULL_WRITER, MetricWriter


def read_scalars(folder):
    """{tag: [(step, value), ...]} of the event files in ``folder``."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


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
