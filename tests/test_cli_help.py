"""What the command line tells a user: --help of each entry script, and the precision a run uses."""

import glob
import json
import os

import pytest
from conftest import run_script

import eval_knn
import eval_video_segmentation
import main_linear
import main_pretrain
from config import get_config

WIDE = {"COLUMNS": "300"}  # help lines unwrapped


@pytest.mark.parametrize(
    "script, own_flags, foreign_flags",
    [
        ("main_pretrain.py", ["--throughput"], ["--eval", "--lr"]),
        ("main_linear.py", ["--throughput", "--eval", "--lr", "--drop-path-rate"], []),
        ("eval_knn.py", [], ["--throughput", "--eval", "--lr"]),
        ("eval_retrieval.py", ["--dump-features", "--load-features"], ["--throughput", "--eval", "--lr"]),
        ("eval_video_segmentation.py", [], ["--throughput", "--eval", "--lr"]),
    ],
)
def test_help_names_the_program_shows_defaults_and_an_example(script, own_flags, foreign_flags):
    result = run_script([script, "--help"], env=WIDE)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith(f"usage: {script} ")
    assert "example:\n  torchrun --nproc_per_node=" in text and f" {script} --cfg configs/" in text
    assert "default O0, fp32 on every device" in text  # the precision rule
    assert "DATA.BATCH_SIZE; default" in text
    for flag in own_flags:
        assert f"  {flag}" in text
    for flag in foreign_flags:
        assert f"  {flag}" not in text


def test_help_defaults_are_those_of_the_script():
    """main_linear.py's --batch-size default is its recipe's (64), pretraining's config.py's."""
    pretrain_help = run_script(["main_pretrain.py", "--help"], env=WIDE).stdout
    linear_help = run_script(["main_linear.py", "--help"], env=WIDE).stdout
    assert f"DATA.BATCH_SIZE; default {get_config().DATA.BATCH_SIZE} unless" in pretrain_help
    assert "DATA.BATCH_SIZE; default 64 unless" in linear_help


@pytest.mark.parametrize("level, words", [(None, "O0 (fp32)"), ("O2", "O2 (bf16 autocast)")])
@pytest.mark.parametrize("script", [main_pretrain, main_linear, eval_knn, eval_video_segmentation])
def test_every_run_logs_and_records_its_precision(script, level, words, tmp_path, image_folder, capsys):
    """Without --amp-opt-level a run on this CPU computes in fp32; config.json records the level used."""
    argv = ["--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder, "--output", str(tmp_path),
            "--batch-size", "4", "--opts", "DATA.IMG_SIZE", "32"]  # fmt: skip
    if level:
        argv += ["--amp-opt-level", level]
    script.setup(argv)
    (written,) = glob.glob(os.path.join(tmp_path, "**", "config.json"), recursive=True)
    with open(written) as f:
        assert json.load(f)["AMP_OPT_LEVEL"] == (level or "O0")
    assert f"precision: AMP_OPT_LEVEL {words} on cpu" in capsys.readouterr().out
