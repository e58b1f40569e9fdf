"""Every key of the config tree has a range (config.RANGES), checked once at start-up.

The cases are generated from the tree: for every leaf key, values of the wrong type and values
just outside its declared bounds go through main_pretrain.py's command line (its ``setup``, in
this process) and must stop it with one line naming the key, exit status 2, no traceback, and
nothing written. The literal cases of the issue that asked for this follow, then the flags of
the other scripts and broken ``--cfg`` files.
"""

import math
import os

import pytest
import torch
from conftest import ROOT

import eval_knn
import eval_retrieval
import eval_video_segmentation
import main_linear
import main_pretrain
from cli import run_cli
from config import (
    _C,
    RANGES,
    Boolean,
    ConfigError,
    Integer,
    Interval,
    ListOf,
    OneOf,
    Text,
    TupleOf,
    check_config,
    check_ranges,
    config_value,
    get_config,
    leaf_keys,
)
from precision import amp_autocast, make_grad_scaler, precision_line

CFG = os.path.join(ROOT, "configs", "moby_vit_tiny.yaml")
KEYS = list(leaf_keys())


# -----------------------------------------------------------------------------
# The table covers the tree
# -----------------------------------------------------------------------------


def test_every_key_has_a_range_and_every_range_a_key():
    assert sorted(set(KEYS) - set(RANGES)) == [], "keys without a range: add them to config.RANGES"
    assert sorted(set(RANGES) - set(KEYS)) == [], "ranges of keys the tree no longer has"
    assert len(KEYS) == len(RANGES) > 90


def test_a_key_without_a_range_is_found():
    config = get_config()
    config.defrost()
    config.TRAIN.NEW_KEY = 1
    with pytest.raises(LookupError, match="TRAIN.NEW_KEY has no entry in config.RANGES"):
        check_ranges(config)


def test_the_defaults_and_every_shipped_config_are_in_range():
    import argparse
    import glob

    check_config(get_config())
    for cfg_file in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))):
        for recipe in (None, main_linear.LINEAR_RECIPE):
            check_config(get_config(argparse.Namespace(cfg=cfg_file, opts=None), recipe))


# -----------------------------------------------------------------------------
# Values outside each range, from its declared bounds
# -----------------------------------------------------------------------------


def number(x):
    """A float as --opts writes it (yacs reads "1.0" as a float, "1" as an int)."""
    return repr(float(x))


def outside(allowed, default):
    """--opts values that ``allowed`` refuses, derived from its declared bounds (``default``: a
    value it allows, for the items of tuples)."""
    if isinstance(allowed, Integer):
        below = [] if allowed.low is None else [str(allowed.low - 1)]
        return below + ([] if allowed.high is None else [str(allowed.high + 1)])
    if isinstance(allowed, Interval):
        values = []
        if allowed.low is not None:
            values += [number(allowed.low - 0.5)] + ([] if allowed.closed_left else [number(allowed.low)])
        if allowed.high is not None:
            values += [number(allowed.high + 0.5)] + ([] if allowed.closed_right else [number(allowed.high)])
        else:
            values.append("1e999")  # inf
        return values
    if isinstance(allowed, OneOf):
        return ["not_a_choice"] + ([] if "" in allowed.choices else ['""'])
    if isinstance(allowed, Text):
        return ['""'] if allowed.non_empty else []
    if isinstance(allowed, Boolean):
        return []
    if isinstance(allowed, ListOf):
        item = allowed.item
        bad_items = outside(item, None) + (["'a'", "1.5"] if isinstance(item, Integer) else ["1", "None"])
        return (["[]"] if allowed.min_len else []) + [f"[{bad}]" for bad in bad_items if bad != '""']
    if isinstance(allowed, TupleOf):
        good = number(default[0])
        bad_items = outside(allowed.item, None) + ["'a'", "None"]
        return [f"({good},)", f"({', '.join([good] * (allowed.length + 1))})"] + [
            f"({bad}, {', '.join([good] * (allowed.length - 1))})" for bad in bad_items
        ]
    raise AssertionError(f"no values outside {type(allowed).__name__} yet: add them here")


def wrong_types(default):
    """--opts values of another type than the key's (``None`` passes yacs: the table refuses it)."""
    if isinstance(default, bool):
        return ["None", "abc", "1"]
    if isinstance(default, int):
        return ["None", "abc", "1.5", "True"]
    if isinstance(default, float):
        return ["None", "abc", "True", "1"]  # an int for a float: yacs's rule, the line says to write 1.0
    if isinstance(default, str):
        return ["None", "1", "True"]
    if isinstance(default, (list, tuple)):
        return ["None", "abc", "5"]
    raise AssertionError(f"no wrong types for {type(default).__name__} yet: add them here")


CASES = [
    (key, value)
    for key in KEYS
    for value in wrong_types(config_value(_C, key)) + outside(RANGES[key], config_value(_C, key))
]


def refuse(setup, main, argv, capsys):
    """(exit status, stderr, the one line with "error: ") of a script's entry point run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(setup, main, argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1, err
    return exit_info.value.code, err, lines[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current folder and an output root that must stay as they are."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield tmp_path / "out"
    assert os.listdir(cwd) == [], "something was written to the current folder"
    assert not (tmp_path / "out").exists(), "the output folder was created"


def argv_of(key, value, output):
    if key == "LOCAL_RANK":  # the launcher's flag (or LOCAL_RANK) always sets it
        return ["--cfg", CFG, "--output", str(output), "--local-rank", value]
    if key == "OUTPUT":  # --output would override it
        return ["--cfg", CFG, "--opts", key, value]
    return ["--cfg", CFG, "--output", str(output), "--opts", key, value]


@pytest.mark.parametrize("key, value", CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_a_value_outside_the_range_is_one_line(key, value, workdir, capsys):
    code, _, line = refuse(main_pretrain.setup, main_pretrain.main, argv_of(key, value, workdir), capsys)
    assert code == 2
    assert key in line and "must be" in line, line


def test_there_are_cases_for_every_key():
    assert {key for key, _ in CASES} == set(KEYS)
    assert len(CASES) > 400


def test_the_inner_ends_of_each_range_are_allowed():
    """The closed ends of every bounded key pass, so the bounds tried above are the edges."""
    config = get_config()
    config.defrost()
    for key in KEYS:
        allowed = RANGES[key]
        *path, leaf = key.split(".")
        node = config_value(config, ".".join(path)) if path else config
        ends = []
        if isinstance(allowed, (Integer, Interval)):
            closed = (getattr(allowed, "closed_left", True), getattr(allowed, "closed_right", True))
            ends = [end for end, inside in zip((allowed.low, allowed.high), closed) if end is not None and inside]
            ends = [type(config_value(_C, key))(end) for end in ends]
        for end in ends:
            saved, node[leaf] = node[leaf], end
            check_ranges(config)
            node[leaf] = saved


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(value):
    for key in KEYS:
        if isinstance(RANGES[key], Interval):
            config = get_config()
            config.defrost()
            *path, leaf = key.split(".")
            (config_value(config, ".".join(path)) if path else config)[leaf] = value
            with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')} {value!r}: must be a number"):
                check_ranges(config)


# -----------------------------------------------------------------------------
# The cases of the issue, literally
# -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, line",
    [
        (["--batch-size", "-4"], "argument --batch-size: DATA.BATCH_SIZE must be an integer >= 1, got '-4'"),
        (["--batch-size", "0"], "argument --batch-size: DATA.BATCH_SIZE must be an integer >= 1, got '0'"),
        (["--accumulation-steps", "-1"],
         "argument --accumulation-steps: TRAIN.ACCUMULATION_STEPS must be an integer >= 0, got '-1'"),
        (["--opts", "DATA.IMG_SIZE", "0"], "error: DATA.IMG_SIZE 0: must be an integer >= 16"),
        (["--opts", "TRAIN.BASE_LR", "-0.1"], "error: TRAIN.BASE_LR -0.1: must be a number >= 0"),
        (["--opts", "MODEL.CONTRAST_MOMENTUM", "2.0"],
         "error: MODEL.CONTRAST_MOMENTUM 2.0: must be a number in [0, 1)"),
        (["--opts", "TRAIN.EPOCHS", "-1"], "error: TRAIN.EPOCHS -1: must be an integer >= 1"),
        (["--opts", "MODEL.CONTRAST_TEMPERATURE", "0.0"],
         "error: MODEL.CONTRAST_TEMPERATURE 0.0: must be a number > 0"),
        (["--opts", "AMP_OPT_LEVEL", "O3"], "error: AMP_OPT_LEVEL 'O3': must be one of '', O0, O1, O2"),
        (["--opts", "TRAIN.BASE_LR", "1"], "error: --opts: TRAIN.BASE_LR 1: must be a number >= 0, not an integer; "
                                           "write it with a decimal point, e.g. 1.0"),
        (["--opts", "DATA.BATCH_SIZE.X", "1"], "error: --opts: no key DATA.BATCH_SIZE.X: DATA.BATCH_SIZE is a key, "
                                               "not a group of keys"),
        (["--opts", "DATA", "5"], "error: --opts: DATA is a group of keys, not a key: set one of them, "
                                  "e.g. DATA.<KEY> <value>"),
        (["--opts", "MODEL.TYPE", "synco", "MODEL.N_HARD", "5000"],
         "error: MODEL.N_HARD 5000 must be in 1..MODEL.CONTRAST_NUM_NEGATIVE (4096)"),
        (["--opts", "TRAIN.START_EPOCH", "300"], "error: TRAIN.START_EPOCH 300 must be below TRAIN.EPOCHS 300: "
                                                 "the run would train no epoch"),
    ],
)  # fmt: skip
def test_the_cases_of_the_issue(args, line, workdir, capsys):
    code, _, found = refuse(main_pretrain.setup, main_pretrain.main, ["--cfg", CFG, "--output", str(workdir), *args],
                            capsys)  # fmt: skip
    assert code == 2 and found.endswith(line), found


def test_an_image_size_swin_cannot_window_is_one_line(workdir, capsys):
    argv = ["--cfg", CFG, "--output", str(workdir), "--opts", "MODEL.ENCODER", "swin_tiny", "DATA.IMG_SIZE", "44"]
    code, _, line = refuse(main_pretrain.setup, main_pretrain.main, argv, capsys)
    assert code == 2 and line.startswith("error: DATA.IMG_SIZE 44 does not fit swin_tiny's windows: ")


def test_an_empty_amp_level_is_fp32_everywhere(image_folder, tmp_path):
    """AMP_OPT_LEVEL "" (the original's configs) stays allowed: fp32, as O0, in every place that reads it."""
    argv = ["--cfg", CFG, "--data-path", image_folder, "--output", str(tmp_path), "--batch-size", "4",
            "--opts", "AMP_OPT_LEVEL", "", "DATA.IMG_SIZE", "32"]  # fmt: skip
    config, env, logger = main_pretrain.setup(argv)
    assert config.AMP_OPT_LEVEL == ""
    log = open(os.path.join(config.OUTPUT, "log_rank0.txt")).read()
    assert "precision: AMP_OPT_LEVEL '' (fp32, as O0) on cpu" in log
    cpu = torch.device("cpu")
    with amp_autocast(config, cpu)():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    assert not make_grad_scaler(config, cpu).is_enabled()
    assert precision_line(config, cpu) == "precision: AMP_OPT_LEVEL '' (fp32, as O0) on cpu"


# -----------------------------------------------------------------------------
# --cfg files that are not a YAML mapping
# -----------------------------------------------------------------------------


def broken_cfg(tmp_path, kind):
    path = tmp_path / f"{kind}.yaml"
    if kind == "passwd":  # what /etc/passwd holds: a line YAML reads as one string
        path.write_text("root:x:0:0:root:/root:/bin/bash\n")
        return str(path), "holds a str, not a mapping of keys"
    if kind == "directory":
        return str(tmp_path), "is a directory, not a YAML file"
    contents = {
        "syntax": ("MODEL:\n  TYPE: [moby\n", "is not valid YAML: expected ',' or ']'"),
        "empty": ("", "is empty: it should hold a mapping of keys"),
        "comments": ("# nothing here\n", "is empty: it should hold a mapping of keys"),
        "list": ("- MODEL\n- TRAIN\n", "holds a list, not a mapping of keys"),
        "number_key": ("1: 2\n", "the key 1 is not a name"),
        "base_string": ("BASE: other.yaml\n", "BASE 'other.yaml' must be a list of file names"),
        "itself": (f"BASE: ['{kind}.yaml']\n", f"BASE {kind}.yaml includes itself"),
        "nan": ("TRAIN:\n  BASE_LR: .nan\n", "TRAIN.BASE_LR nan: must be a number >= 0"),
        "mapping_value": ("TRAIN:\n  EPOCHS: {a: 1}\n", "TRAIN.EPOCHS a: 1: must be an integer >= 1, not a mapping"),
    }
    if kind == "binary":
        path.write_bytes(b"\xff\xfe\x00\x81 not text")
        return str(path), "is not a text file"
    text, message = contents[kind]
    path.write_text(text)
    return str(path), message


@pytest.mark.parametrize(
    "kind",
    ["passwd", "directory", "syntax", "empty", "comments", "list", "number_key", "base_string", "itself", "nan",
     "mapping_value", "binary"],
)  # fmt: skip
def test_a_cfg_that_is_not_a_yaml_mapping_is_one_line(kind, tmp_path, workdir, capsys):
    cfg, message = broken_cfg(tmp_path, kind)
    code, err, line = refuse(main_pretrain.setup, main_pretrain.main, ["--cfg", cfg, "--output", str(workdir)], capsys)
    assert code == 2 and line.startswith("error: ") and message in line, line
    if kind != "nan":  # a value out of range names its key instead
        assert os.path.basename(cfg) in line, line


# -----------------------------------------------------------------------------
# The other scripts: their flags, and the checks that moved from their setup into the table
# -----------------------------------------------------------------------------

SCRIPTS = {"linear": main_linear, "knn": eval_knn, "retrieval": eval_retrieval, "davis": eval_video_segmentation}


@pytest.mark.parametrize(
    "script, args, line",
    [
        ("linear", ["--lr", "-1"], "argument --lr: TRAIN.BASE_LR must be a number >= 0, got '-1'"),
        ("linear", ["--drop-path-rate", "1.0"],
         "argument --drop-path-rate: MODEL.DROP_PATH_RATE must be a number in [0, 1), got '1.0'"),
        ("linear", ["--batch-size", "x"], "argument --batch-size: DATA.BATCH_SIZE must be an integer >= 1, got 'x'"),
        ("knn", ["--nb-knn", "5", "0"], "argument --nb-knn/--nb_knn: KNN.NB_KNN must be an integer >= 1, got '0'"),
        ("knn", ["--temperature", "0"], "argument --temperature: KNN.TEMPERATURE must be a number > 0, got '0'"),
        ("knn", ["--temperature", "nan"], "argument --temperature: KNN.TEMPERATURE must be a number > 0, got 'nan'"),
        ("linear", ["--opts", "LINEAR_EVAL.WEIGHTS", "frozen"],
         "error: LINEAR_EVAL.WEIGHTS 'frozen': must be one of freeze, finetune"),
        ("knn", ["--opts", "KNN.NB_KNN", "[10, 0]"],
         "error: KNN.NB_KNN [10, 0]: must be a non-empty list, each item an integer >= 1"),
        ("retrieval", ["--opts", "DATA.DATASET", "roxford5k", "RETRIEVAL.IMG_SIZE", "0"],
         "error: RETRIEVAL.IMG_SIZE 0: must be an integer >= 16"),
        ("davis", ["--opts", "DAVIS.TOPK", "0"], "error: DAVIS.TOPK 0: must be an integer >= 1"),
        ("davis", ["--opts", "DAVIS.SHORT_SIDE", "8"], "error: DAVIS.SHORT_SIDE 8: must be an integer >= 16"),
        ("davis", ["--opts", "DAVIS.TEMPERATURE", "0.0"], "error: DAVIS.TEMPERATURE 0.0: must be a number > 0"),
    ],
)  # fmt: skip
def test_the_other_scripts_refuse_with_one_line(script, args, line, workdir, capsys):
    module = SCRIPTS[script]
    code, _, found = refuse(module.setup, module.main, ["--cfg", CFG, "--output", str(workdir), *args], capsys)
    assert code == 2 and found.endswith(line), found
