"""Bad input stops main_pretrain.py before any work, with one line naming the fix.

Most cases call the script's entry point in this process (fast); two run it as a
real subprocess to see exactly what a user sees.
"""

import os
import subprocess
import zipfile

import pytest
import torch
from conftest import run_script, save_code_running_checkpoint

import main_pretrain
from cli import run_cli

BASE = ["main_pretrain.py", "--amp-opt-level", "O0"]
SMALL = ["DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0", "MODEL.PROJ_HIDDEN_DIM", "64"]


def assert_clean_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def run(tmp_path, image_folder, capsys):
    """main_pretrain.py's entry point in this process; returns its exit code and stderr."""

    def _run(*args, cfg="configs/moby_vit_tiny.yaml", data=image_folder):
        data_args = ["--data-path", data] if data else []
        argv = [*BASE[1:], "--cfg", cfg, "--output", str(tmp_path), *data_args, *args]
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main_pretrain.setup, main_pretrain.main, argv)
        return subprocess.CompletedProcess(argv, exit_info.value.code, "", capsys.readouterr().err)

    return _run


@pytest.mark.slow
def test_missing_data_path_in_a_real_process(tmp_path):
    missing = str(tmp_path / "nowhere")
    result = run_script([*BASE, "--cfg", "configs/moby_vit_tiny.yaml", "--output", str(tmp_path), "--data-path",
                         missing, "--batch-size", "4", "--opts", *SMALL])  # fmt: skip
    assert_clean_error(result, missing)
    assert os.listdir(tmp_path) == []  # no run folder left behind


def test_a_wrong_data_path_leaves_no_run_folder(run, tmp_path):
    assert_clean_error(run(data=str(tmp_path / "nowhere")), f"{tmp_path / 'nowhere' / 'train'} not found")
    assert os.listdir(tmp_path) == []


def test_no_data_path_given(run):
    assert_clean_error(run("--batch-size", "4", data=None), "--data-path")


def test_a_vit_patch_that_does_not_divide_the_image_is_one_line(run, tmp_path):
    assert_clean_error(
        run("--opts", *SMALL, "MODEL.VIT.PATCH_SIZE", "5"),
        "error: DATA.IMG_SIZE 32 is not a multiple of MODEL.VIT.PATCH_SIZE 5: set DATA.IMG_SIZE to 30 or "
        "MODEL.VIT.PATCH_SIZE to a divisor of 32",
    )
    assert os.listdir(tmp_path) == []


def test_unknown_key_in_opts(run):
    assert_clean_error(run("--opts", "MODEL.NOT_A_KEY", "1"), "MODEL.NOT_A_KEY")
    assert_clean_error(run("--opts", "TRAIN.EPOCH", "1"), "TRAIN.EPOCH; did you mean TRAIN.EPOCHS or ")


def test_unknown_key_in_yaml(run, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("TRAIN:\n  EPOCHZ: 3\n")
    assert_clean_error(run(cfg=str(cfg)), "EPOCHZ; did you mean TRAIN.EPOCHS", "bad.yaml")


def test_missing_cfg_file(run, tmp_path):
    assert_clean_error(run(cfg=str(tmp_path / "none.yaml")), "none.yaml")


@pytest.mark.parametrize("key, value", [("MODEL.TYPE", "simclr"), ("MODEL.ENCODER", "resnet26")])
def test_unknown_framework_or_encoder_lists_valid_ones(run, key, value):
    valid = ["moby, byol, synco"] if key == "MODEL.TYPE" else ["swin_tiny", "vit_base", "resnet18, resnet34, resnet50"]
    assert_clean_error(run("--opts", key, value), value, *valid)


def test_queue_not_divisible_by_global_batch(run):
    assert_clean_error(run("--batch-size", "48"), "4096", "48", "--batch-size")


def test_global_batch_larger_than_dataset(run):
    # 16 training images, batch 32 divides the queue of 4096
    assert_clean_error(run("--batch-size", "32", "--opts", *SMALL), "32", "16 images")


def test_resume_path_that_does_not_exist(run, tmp_path):
    missing = str(tmp_path / "ckpt.pth")
    assert_clean_error(run("--batch-size", "4", "--resume", missing, "--opts", *SMALL), missing)


def test_resume_checkpoint_of_another_framework(run, tmp_path):
    ckpt = tmp_path / "byol.pth"
    torch.save({"framework": {"type": "byol", "encoder": "vit_small"}, "model": {}, "epoch": 0}, ckpt)
    assert_clean_error(run("--batch-size", "4", "--resume", str(ckpt), "--opts", *SMALL), "byol / vit_small",
                       "moby / vit_tiny")  # fmt: skip


def test_resume_unreadable_checkpoint(run, tmp_path):
    ckpt = tmp_path / "torn.pth"
    ckpt.write_bytes(b"PK\x03\x04 not a checkpoint")
    assert_clean_error(run("--batch-size", "4", "--resume", str(ckpt), "--opts", *SMALL), "torn.pth", "unreadable")


def test_resume_checkpoint_that_would_run_code(run, tmp_path):
    ckpt, marker = tmp_path / "foreign.pth", tmp_path / "marker"
    save_code_running_checkpoint(ckpt, marker)
    result = run("--batch-size", "4", "--resume", str(ckpt), "--opts", *SMALL)
    assert_clean_error(result, f"refused to load {ckpt}", "builtins.exec", "--trust-checkpoint")
    assert not marker.exists()


def test_zip_mode_without_map_file(run, tmp_path):
    folder = tmp_path / "zipped"
    folder.mkdir()
    with zipfile.ZipFile(folder / "train.zip", "w") as zf:
        zf.writestr("a/1.png", b"")
    assert_clean_error(run("--zip", "--batch-size", "4", "--opts", *SMALL, data=str(folder)), "train_map.txt")


@pytest.mark.slow
def test_output_folder_that_cannot_be_created(run, tmp_path, image_folder):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_script([*BASE, "--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder, "--output",
                         str(blocker / "out")])  # fmt: skip
    assert_clean_error(result, "output folder", str(blocker))
