"""What the command line tells a user: --help of each entry script, and the precision a run uses."""

import glob
import json
import os

import pytest
import torch
from conftest import run_script

import eval_knn
import eval_retrieval
import eval_video_segmentation
import main_linear
import main_pretrain
from config import get_config


def script_help(script, monkeypatch, capsys):
    """What ``python <script> --help`` prints, from the script's own parser (in this process)."""
    monkeypatch.setenv("COLUMNS", "300")  # help lines unwrapped
    with pytest.raises(SystemExit) as exit_info:
        script.parse_option(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


DATA = ["--data-path", "--zip", "--cache-mode"]  # the image folders main_pretrain, main_linear and eval_knn read
TRAINING = ["--resume", "--accumulation-steps", "--use-checkpoint", "--accept-changes"]  # the training runs'


@pytest.mark.parametrize(
    "script, own_flags, foreign_flags, batch_size",
    [
        (main_pretrain, [*DATA, *TRAINING, "--throughput"], ["--eval", "--lr"], get_config().DATA.BATCH_SIZE),
        (main_linear, [*DATA, *TRAINING, "--throughput", "--eval", "--lr", "--drop-path-rate"], [], 64),  # recipe's
        (eval_knn, DATA, [*TRAINING, "--throughput", "--eval", "--lr"], get_config().DATA.BATCH_SIZE),
        (eval_retrieval, ["--dump-features", "--load-features"], [*DATA, *TRAINING, "--throughput", "--eval"], None),
        (eval_video_segmentation, [], [*DATA, *TRAINING, "--throughput", "--eval", "--lr"], None),
    ],
)
def test_help_names_the_program_shows_defaults_and_an_example(
    script, own_flags, foreign_flags, batch_size, monkeypatch, capsys
):
    name = os.path.basename(script.__file__)
    text = script_help(script, monkeypatch, capsys)
    assert text.startswith(f"usage: {name} ")
    assert "example:\n  torchrun --nproc_per_node=" in text and f" {name} --cfg configs/" in text
    assert "default O0, fp32 on every device" in text  # the precision rule
    assert "DATA.BATCH_SIZE; default" in text
    if batch_size is not None:
        assert f"DATA.BATCH_SIZE; default {batch_size} unless" in text
    for flag in own_flags:
        assert f"  {flag}" in text
    for flag in foreign_flags:
        assert f"  {flag}" not in text


@pytest.mark.slow
def test_help_answers_before_torch_loads():
    """Each entry script parses its arguments before it imports torch: --help never waits for it."""
    code = (
        "import runpy, sys\n"
        "for script in ['main_pretrain.py', 'main_linear.py', 'eval_knn.py', 'eval_retrieval.py',\n"
        "               'eval_video_segmentation.py']:\n"
        "    sys.argv = [script, '--help']\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, script\n"
        "    assert 'torch' not in sys.modules, script\n"
        "print('no torch')\n"
    )
    result = run_script(["-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("usage: ") == 5 and result.stdout.endswith("no torch\n")


@pytest.mark.slow
def test_help_in_a_real_process_names_the_program_as_typed():
    result = run_script(["main_pretrain.py", "--help"], env={"COLUMNS": "300"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: main_pretrain.py ")
    assert "example:\n  torchrun --nproc_per_node=" in result.stdout


@pytest.mark.parametrize("level, words", [(None, "O0 (fp32)"), ("O2", "O2 (bf16 autocast)")])
@pytest.mark.parametrize("script", [main_pretrain, main_linear, eval_knn, eval_video_segmentation])
def test_every_run_logs_and_records_its_precision(script, level, words, tmp_path, image_folder, capsys):
    """Without --amp-opt-level a run on this CPU computes in fp32; config.json records the level used."""
    argv = ["--cfg", "configs/moby_vit_tiny.yaml", "--output", str(tmp_path), "--batch-size", "4",
            "--opts", "DATA.IMG_SIZE", "32"]  # fmt: skip
    if script is not main_pretrain:  # evaluations need a checkpoint to read the encoder from
        torch.save({"model": {}, "epoch": 0}, tmp_path / "pretrained.pth")
        argv += ["LINEAR_EVAL.PRETRAINED", str(tmp_path / "pretrained.pth")]
    if script is eval_video_segmentation:  # DAVIS's layout under DATA.TRANSFER_ROOT (setup checks it)
        davis = tmp_path / "data" / "DAVIS"
        for path in ("ImageSets/2017/val.txt", "JPEGImages/480p/v/00000.jpg", "Annotations/480p/v/00000.png"):
            (davis / path).parent.mkdir(parents=True, exist_ok=True)
            (davis / path).write_text("v\n")
        argv += ["DATA.TRANSFER_ROOT", str(tmp_path / "data")]
    else:
        argv += ["--data-path", image_folder]
    if level:
        argv += ["--amp-opt-level", level]
    script.setup(argv)
    (written,) = glob.glob(os.path.join(tmp_path, "**", "config.json"), recursive=True)
    with open(written) as f:
        assert json.load(f)["AMP_OPT_LEVEL"] == (level or "O0")
    assert f"precision: AMP_OPT_LEVEL {words} on cpu" in capsys.readouterr().out
