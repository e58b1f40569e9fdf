"""main_linear.py and eval_knn.py, run in this process (cli.run_cli), on data that is missing or
damaged: a transfer set that cannot be downloaded and an unreadable image of a set measured whole
end the run with one line and exit code 2, also from a loader worker; unreadable training images
are replaced, with a warning naming each and a count."""

import glob
import io
import os
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import eval_knn
import main_linear
from cli import run_cli
from config import get_config
from faults import process_fault
from models import build_encoder

# one loader worker: the unreadable image is met in another process, as in a real run
SMALL = ["--batch-size", "2", "--opts", "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "1", "PRINT_FREQ", "1"]


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """A checkpoint of a vit_tiny encoder at 32 px, as a plain state dict (no config)."""
    config = get_config()
    config.defrost()
    config.merge_from_list(["MODEL.ENCODER", "vit_tiny", "DATA.IMG_SIZE", 32])
    config.freeze()
    state = build_encoder(config, drop_path_rate=0.0).state_dict()
    path = tmp_path_factory.mktemp("encoder") / "encoder.pth"
    torch.save({"model": {f"encoder.{k}": v for k, v in state.items()}}, path)
    return str(path)


def image_folder(root, bad_split=None):
    """train/ and val/ of 2 classes x 3 PNGs; ``bad_split`` also holds a truncated JPEG and an
    empty file, whose paths are returned."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(root / split / c)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    if bad_split is None:
        return []
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    bad = [root / bad_split / "a" / "truncated.jpg", root / bad_split / "b" / "empty.jpg"]
    bad[0].write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    bad[1].write_bytes(b"")
    return [str(path) for path in bad]


def run(script, argv, capsys):
    """(exit code, stderr) of ``script``'s entry point run on ``argv`` in this process."""
    try:
        run_cli(script.setup, script.main, argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line(code, stderr, pattern):
    assert code == 2 and "Traceback" not in stderr, stderr
    (line,) = stderr.splitlines()
    assert re.fullmatch(pattern, line), line
    return line


def argv(data, output, encoder_file, *opts):
    return ["--cfg", "configs/moby_vit_tiny.yaml", "--data-path", str(data), "--output", str(output), *SMALL,
            "LINEAR_EVAL.PRETRAINED", encoder_file, *opts]  # fmt: skip


def test_an_offline_transfer_set_is_one_line(tmp_path, encoder_file, capsys, monkeypatch):
    def urlopen(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    root = tmp_path / "transfer"
    code, stderr = run(main_linear, argv(tmp_path, tmp_path / "out", encoder_file, "DATA.DATASET", "cifar10",
                                         "DATA.TRANSFER_ROOT", str(root)), capsys)  # fmt: skip
    line = assert_one_line(code, stderr, rf"error: cifar10 is not under {root} \(DATA.TRANSFER_ROOT\) .*")
    assert "could not be downloaded (URLError: <urlopen error [Errno -3] Temporary failure in name resolution>)" in line
    assert f"fetch https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and put it at {root}/cifar-10-python" in line


def test_linear_training_replaces_unreadable_images_and_counts_them(tmp_path, encoder_file, capsys):
    bad = image_folder(tmp_path / "data", "train")
    code, stderr = run(main_linear, argv(tmp_path / "data", tmp_path / "out", encoder_file, "TRAIN.EPOCHS", "2"),
                       capsys)  # fmt: skip
    assert code == 0 and stderr == ""
    (log,) = glob.glob(str(tmp_path / "out" / "*" / "*" / "linear_imagenet_linprob" / "log_rank0.txt"))
    log = open(log).read()
    for path in bad:  # once each, by the worker that met it
        assert len(re.findall(rf"WARNING skipping unreadable image {re.escape(path)}: \w+: ", log)) == 1
    counts = [int(n) for n in re.findall(r"epoch \d: skipped (\d+) unreadable training images", log)]
    assert len(counts) == 2 and min(counts) >= 2  # both bad images are in every epoch (no image is dropped)
    assert "EPOCH 1 imagenet val (6 images): top-1" in log


def test_an_unreadable_validation_image_stops_linear_eval_with_one_line(tmp_path, encoder_file, capsys):
    bad = image_folder(tmp_path / "data", "val")
    code, stderr = run(main_linear, argv(tmp_path / "data", tmp_path / "out", encoder_file, "TRAIN.EPOCHS", "1"),
                       capsys)  # fmt: skip
    files = "|".join(re.escape(path) for path in bad)
    assert_one_line(code, stderr, rf"error: unreadable image ({files}): \w+: .+; an evaluation set is measured whole, "
                                  "so no image is skipped: replace the file or remove it")  # fmt: skip


@pytest.mark.parametrize("bad_split", ["train", "val"])
def test_an_unreadable_image_stops_knn_with_one_line(tmp_path, encoder_file, capsys, bad_split):
    bad = image_folder(tmp_path / "data", bad_split)
    code, stderr = run(eval_knn, argv(tmp_path / "data", tmp_path / "out", encoder_file), capsys)
    assert_one_line(code, stderr, rf"error: unreadable image ({'|'.join(map(re.escape, bad))}): \w+: .+")


def test_a_worker_that_raised_is_not_a_worker_that_died():
    config = get_config()
    raised = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback ...")
    assert process_fault(raised, config, 0, 3) is None
    for died in ("DataLoader worker (pid 7) is killed by signal: Killed.", "DataLoader worker (pid(s) 7) exited "
                 "unexpectedly"):  # fmt: skip
        assert "a data loader worker died" in str(process_fault(RuntimeError(died), config, 0, 3))
