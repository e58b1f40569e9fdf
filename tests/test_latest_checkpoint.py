"""checkpoint.pth an epoch behind the newest numbered checkpoint, as a run killed between the
two files of a save leaves it: a restart makes checkpoint.pth current before anything else,
and every evaluation reads the run's newest checkpoint, by auto-resume's rule."""

import argparse
import filecmp
import logging
import os
import re
import shutil

import pytest
import torch
from conftest import TINY, run_folder, run_script, small_config

import main_pretrain
from checkpoint import read_run_checkpoint
from cli import run_cli
from distributed import DistEnv
from main_linear import build_classifier
from pretrained import inherit_encoder_settings, load_run_encoder
from tools import export_backbone

EPOCHS = 3
CFG = "configs/moby_vit_tiny.yaml"


def pretrain(image_folder, output, *opts):
    """A run of EPOCHS epochs with a numbered checkpoint after each (SAVE_FREQ 1)."""
    result = run_script(["main_pretrain.py", "--cfg", CFG, "--data-path", image_folder, "--output", str(output),
                         "--tag", "t", *TINY, "TRAIN.EPOCHS", str(EPOCHS), "SAVE_FREQ", "1", *opts])  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def finished(image_folder, tmp_path_factory):
    """Output root of a finished run: ckpt_epoch_{0,1,2}.pth and checkpoint.pth of epoch 2."""
    output = tmp_path_factory.mktemp("finished")
    pretrain(image_folder, output)
    yield output
    shutil.rmtree(output, ignore_errors=True)


def link_or_copy(src, dst):
    """Hard-link a checkpoint (a run only ever replaces or deletes one, never writes into it), copy the rest."""
    if src.endswith(".pth"):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def copy_run(finished, tmp_path, behind, remove=()):
    """A copy of the finished run whose checkpoint.pth holds ckpt_epoch_{behind}.pth's bytes."""
    output = tmp_path / "out"
    shutil.copytree(finished, output, copy_function=link_or_copy)
    folder = run_folder(output)
    for epoch in remove:
        os.remove(os.path.join(folder, f"ckpt_epoch_{epoch}.pth"))
    os.remove(os.path.join(folder, "checkpoint.pth"))
    shutil.copyfile(os.path.join(folder, f"ckpt_epoch_{behind}.pth"), os.path.join(folder, "checkpoint.pth"))
    return output, folder


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def encoder_of(path):
    return {k[len("encoder.") :]: v for k, v in load(path)["model"].items() if k.startswith("encoder.")}


def knn_loaded(image_folder, output):
    """(file name, epoch) of the checkpoint eval_knn.py says it loaded."""
    result = run_script(["eval_knn.py", "--cfg", CFG, "--data-path", image_folder, "--output", str(output),
                         "--tag", "t", *TINY])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ((path, epoch),) = re.findall(r"loaded the encoder of (\S+) \(pretraining epoch (\d+)\)", result.stdout)
    return os.path.basename(path), int(epoch)


def export_loaded(folder, out, capsys):
    """(file name, epoch) of the checkpoint tools/export_backbone.py says it read from the run folder."""
    export_backbone.main([folder, str(out)])
    ((path, epoch),) = re.findall(r"^read (\S+) \(epoch (\d+)\)$", capsys.readouterr().out, re.M)
    return os.path.basename(path), int(epoch)


@pytest.mark.slow
def test_behind_at_the_last_epoch(finished, image_folder, tmp_path, capsys):
    output, folder = copy_run(finished, tmp_path, behind=EPOCHS - 2)
    latest, last = os.path.join(folder, "checkpoint.pth"), os.path.join(folder, f"ckpt_epoch_{EPOCHS - 1}.pth")
    assert knn_loaded(image_folder, output) == (f"ckpt_epoch_{EPOCHS - 1}.pth", EPOCHS - 1)

    out = pretrain(image_folder, output)
    assert f"{latest} was behind {last} (epoch {EPOCHS - 1}): replaced by a copy of it" in out
    assert f"run complete: all {EPOCHS} epochs already trained, checkpoint {last} (epoch {EPOCHS - 1})" in out
    assert "start training" not in out and "training time" not in out and "Train:" not in out
    assert load(latest)["epoch"] == EPOCHS - 1 and filecmp.cmp(latest, last, shallow=False)

    assert export_loaded(folder, tmp_path / "backbone", capsys) == ("checkpoint.pth", EPOCHS - 1)
    exported = torch.load(tmp_path / "backbone.pth", weights_only=True)
    assert all(torch.equal(exported[k], v) for k, v in encoder_of(last).items())


@pytest.mark.slow
def test_behind_at_a_middle_epoch(finished, image_folder, tmp_path, capsys):
    # killed after ckpt_epoch_1.pth, before checkpoint.pth followed: epoch 2 never ran
    output, folder = copy_run(finished, tmp_path, behind=0, remove=[2])
    latest, middle = os.path.join(folder, "checkpoint.pth"), os.path.join(folder, "ckpt_epoch_1.pth")
    assert export_loaded(folder, tmp_path / "before", capsys) == ("ckpt_epoch_1.pth", 1)

    out = pretrain(image_folder, output)
    lines = out.splitlines()
    made_current = [i for i, line in enumerate(lines) if f"{latest} was behind {middle} (epoch 1)" in line]
    resumed = [i for i, line in enumerate(lines) if f"resumed from {middle} (epoch 1)" in line]
    started = [i for i, line in enumerate(lines) if "start training" in line]
    assert len(made_current) == len(resumed) == len(started) == 1
    assert made_current[0] < resumed[0] < started[0]  # before anything else
    assert "run complete" not in out and f"Train: [2/{EPOCHS}]" in out and "Train: [1/" not in out

    # trained on from epoch 1's weights: the same epoch 2 as the uninterrupted run
    ckpt = load(latest)
    assert ckpt["epoch"] == 2 and filecmp.cmp(latest, os.path.join(folder, "ckpt_epoch_2.pth"), shallow=False)
    straight = load(os.path.join(run_folder(finished), "checkpoint.pth"))
    for key, value in straight["model"].items():
        torch.testing.assert_close(ckpt["model"][key], value, rtol=0, atol=1e-6, msg=key)
    assert export_loaded(folder, tmp_path / "after", capsys) == ("checkpoint.pth", 2)


@pytest.mark.slow
def test_an_explicit_checkpoint_is_read_as_it_is(finished, tmp_path, caplog):
    output, folder = copy_run(finished, tmp_path, behind=0)
    logger = logging.getLogger("test_latest_checkpoint")
    logger.propagate = True
    caplog.set_level(logging.INFO, logger.name)
    stale = os.path.join(folder, "checkpoint.pth")
    for pretrained, expected in [("", "ckpt_epoch_2.pth"), (stale, "ckpt_epoch_0.pth")]:
        config = small_config("moby", OUTPUT=folder, LINEAR_EVAL__PRETRAINED=pretrained)
        model = build_classifier(config, num_classes=2, freeze=True)
        load_run_encoder(model, config, logger)
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in encoder_of(os.path.join(folder, expected)).items())
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        f"loaded the encoder of {os.path.join(folder, 'ckpt_epoch_2.pth')} (pretraining epoch 2)",
        f"loaded the encoder of {stale} (pretraining epoch 0)",
    ]


@pytest.mark.slow
def test_weights_come_from_the_file_whose_settings_were_taken(finished, tmp_path, caplog):
    # the folder holds epoch 1 and a torn ckpt_epoch_2.pth; once evaluation has taken the settings,
    # a running save puts a good epoch 2 there: the weights stay those of the file read for them
    output, folder = copy_run(finished, tmp_path, behind=1, remove=[2])
    newer = os.path.join(folder, "ckpt_epoch_2.pth")
    with open(newer, "wb") as f:
        f.write(b"torn")
    logger = logging.getLogger("test_latest_checkpoint")
    logger.propagate = True
    caplog.set_level(logging.INFO, logger.name)
    config = small_config("moby", OUTPUT=folder)
    args = argparse.Namespace(opts=None)
    held, notes = inherit_encoder_settings(config, args, DistEnv())
    latest = os.path.join(folder, "checkpoint.pth")
    assert notes == [
        f"encoder settings as in the config of {latest}: MODEL.ENCODER vit_tiny, DATA.IMG_SIZE 32, "
        "MODEL.VIT.PATCH_SIZE 16"
    ]
    assert caplog.records == []  # the skip is logged once, by the evaluation's own logger
    shutil.copyfile(os.path.join(run_folder(finished), "ckpt_epoch_2.pth"), newer + ".tmp")
    os.replace(newer + ".tmp", newer)

    model = build_classifier(config, num_classes=2, freeze=True)
    assert load_run_encoder(model, config, logger, held) == 1
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in encoder_of(os.path.join(folder, "ckpt_epoch_1.pth")).items())
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and messages[0].startswith("skipping ") and newer in messages[0]
    assert caplog.records[0].levelno == logging.WARNING
    assert messages[1] == f"loaded the encoder of {latest} (pretraining epoch 1)"

    # read once: a second evaluation in this process reads the folder anew, now epoch 2
    held, _ = inherit_encoder_settings(config, args, DistEnv())
    assert load_run_encoder(model, config, logger, held) == 2


def test_readers_leave_the_temporary_files_of_a_running_save(tmp_path):
    logger = logging.getLogger("test_latest_checkpoint")
    torch.save({"epoch": 3}, tmp_path / "checkpoint.pth")
    (tmp_path / "checkpoint.pth.tmp.123").write_bytes(b"being written")
    path, ckpt = read_run_checkpoint(str(tmp_path), logger)
    assert (path, ckpt["epoch"]) == (str(tmp_path / "checkpoint.pth"), 3)
    assert (tmp_path / "checkpoint.pth.tmp.123").exists()
    assert read_run_checkpoint(str(tmp_path / "none.pth"), logger) == (None, None)


@pytest.mark.slow
@pytest.mark.parametrize("resume", [True, False])
def test_a_start_older_than_the_folders_newest_is_refused(finished, image_folder, tmp_path, capsys, resume):
    """--resume of an older checkpoint, or TRAIN.AUTO_RESUME False, into a run folder: the run's saves
    would stay behind the folder's newer checkpoints, which resumes and evaluations read."""
    output, folder = copy_run(finished, tmp_path, behind=EPOCHS - 1)
    flags = ["--resume", os.path.join(folder, "ckpt_epoch_0.pth")] if resume else []
    opts = [] if resume else ["TRAIN.AUTO_RESUME", "False"]
    checkpoints = {name: os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder) if ".pth" in name}
    argv = ["--cfg", CFG, "--data-path", image_folder, "--output", str(output), "--tag", "t", *flags, *TINY,
            "TRAIN.EPOCHS", str(EPOCHS), *opts]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main_pretrain.setup, main_pretrain.main, argv)
    (line,) = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and line.startswith("error: ")
    first = 1 if resume else 0
    assert f"checkpoint.pth already holds epoch {EPOCHS - 1}, and this run would train again from epoch {first}" in line
    assert f"E >= {first} out of {folder}" in line
    assert {name: os.path.getmtime(os.path.join(folder, name)) for name in checkpoints} == checkpoints
