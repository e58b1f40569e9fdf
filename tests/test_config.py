import argparse
import glob
import os

import pytest
import yaml

from config import ConfigError, check_config, get_config, inert_settings


def args(**kw):
    defaults = dict(cfg=None, opts=None, batch_size=None, data_path=None, zip=False, cache_mode=None, resume=None,
                    accumulation_steps=None, use_checkpoint=False, amp_opt_level=None, output=None, tag=None,
                    eval=False, throughput=False, local_rank=None)  # fmt: skip
    defaults.update(kw)
    return argparse.Namespace(**defaults)


def test_yaml_inherits_its_bases_and_overrides_defaults():
    config = get_config(args(cfg="configs/synco_swin_small.yaml"))
    assert config.MODEL.TYPE == "synco"  # from _base_/synco.yaml
    assert config.MODEL.CONTRAST_TEMPERATURE == 0.2 and config.TRAIN.BASE_LR == 0.001  # from _base_/moby.yaml
    assert config.MODEL.ENCODER == "swin_small" and config.MODEL.N_HARD == 256
    assert config.TRAIN.MIN_LR == 5e-6  # a default no file touches


def test_flags_then_opts_override_and_output_folder(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    config = get_config(
        args(cfg="configs/byol_vit_small.yaml", batch_size=32, data_path="/data", zip=True, cache_mode="full",
             output="runs", tag="exp", amp_opt_level="O2", opts=["TRAIN.EPOCHS", "7", "DATA.BATCH_SIZE", "64"])
    )  # fmt: skip
    assert config.DATA.BATCH_SIZE == 32  # the flag wins over --opts, as in the original
    assert (config.DATA.DATA_PATH, config.DATA.ZIP_MODE, config.DATA.CACHE_MODE) == ("/data", True, "full")
    assert config.TRAIN.EPOCHS == 7 and config.AMP_OPT_LEVEL == "O2"
    assert config.OUTPUT == "runs/byol__vit_small__odpr02_tdpr0_cm0996_proj2_pred2/exp"
    assert config.LOCAL_RANK == 3
    assert get_config(args(local_rank=1)).LOCAL_RANK == 1


def test_config_is_frozen():
    config = get_config(args(cfg="configs/moby_vit_tiny.yaml"))
    with pytest.raises(AttributeError):
        config.TRAIN.EPOCHS = 1


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.TYPE", "dino"], "MODEL.TYPE"),
        (["MODEL.ENCODER", "resnet"], "MODEL.ENCODER"),
        (["AMP_OPT_LEVEL", "O3"], "AMP_OPT_LEVEL"),
        (["MODEL.TYPE", "synco", "MODEL.N_HARD", "5000"], "N_HARD"),
        (["MODEL.TYPE", "synco", "MODEL.N4", "-1"], "N4"),
    ],
)
def test_check_config_names_the_key(opts, message):
    with pytest.raises(ConfigError, match=message):
        check_config(get_config(args(opts=opts)))


def test_a_vit_patch_must_divide_the_image_size():
    vit = ["MODEL.ENCODER", "vit_tiny", "DATA.IMG_SIZE", "32"]
    check_config(get_config(args(opts=[*vit, "MODEL.VIT.PATCH_SIZE", "4"])))
    with pytest.raises(ConfigError) as error:
        check_config(get_config(args(opts=[*vit, "MODEL.VIT.PATCH_SIZE", "6"])))
    assert str(error.value) == (
        "DATA.IMG_SIZE 32 is not a multiple of MODEL.VIT.PATCH_SIZE 6: set DATA.IMG_SIZE to 30 or "
        "MODEL.VIT.PATCH_SIZE to a divisor of 32"
    )
    # the key shapes ViTs only
    check_config(get_config(args(opts=["MODEL.ENCODER", "resnet18", "DATA.IMG_SIZE", "36"])))


def test_odd_opts_and_unknown_keys_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="pairs"):
        get_config(args(opts=["TRAIN.EPOCHS"]))
    with pytest.raises(ConfigError, match="TRAIN.NOPE"):
        get_config(args(opts=["TRAIN.NOPE", "1"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("BASE: ['missing_base.yaml']\n")
    with pytest.raises(ConfigError, match="missing_base.yaml"):
        get_config(args(cfg=str(bad)))


# -----------------------------------------------------------------------------
# Every shipped config resolves to what the original code ran
# -----------------------------------------------------------------------------

# Groups of columns; a row of the table is the union of its groups, so a new column is
# one more key in a group (or one more group) and a new config one more row.
DROP_PATH_AND_STOP_GRAD = {
    # MoBY and SynCo as published; BYOL as the original ran (its configs comment these lines out)
    "MODEL.ONLINE_DROP_PATH_RATE": 0.2,
    "MODEL.TARGET_DROP_PATH_RATE": 0.0,
    "MODEL.STOP_GRAD_CONV1": False,
}
SYNCO_COUNTS = {  # the original SynCo constructor's defaults, which ran: 576 synthetic negatives per query
    "MODEL.N_HARD": 256,
    "MODEL.N1": 128, "MODEL.N2": 128, "MODEL.N3": 128,
    "MODEL.N4": 64, "MODEL.N5": 64, "MODEL.N6": 64,
}  # fmt: skip

AUGMENTATION = {  # BYOL's asymmetric views (tests/data/test_pretrain_data.py checks the recipe), bilinear crops
    "AUG.SSL_AUG": True,
    "AUG.SSL_AUG_TYPE": "byol",
    "AUG.SSL_AUG_CROP": 0.08,
    "AUG.SSL_AUG_INTERPOLATION": "bilinear",
}

RESNET_DROP_PATH = {  # the original built its ResNets without drop path, fine-tuning included
    "MODEL.ONLINE_DROP_PATH_RATE": 0.0,
    "MODEL.TARGET_DROP_PATH_RATE": 0.0,
    "MODEL.DROP_PATH_RATE": 0.0,
    "MODEL.STOP_GRAD_CONV1": False,
}
RESNET_CONTRASTIVE = {  # the original's {moby,synco}_resnet50.yaml
    "TRAIN.OPTIMIZER.NAME": "sgd", "TRAIN.OPTIMIZER.MOMENTUM": 0.9, "TRAIN.BASE_LR": 1e-3, "TRAIN.WEIGHT_DECAY": 0.05,
    "TRAIN.EPOCHS": 300, "TRAIN.WARMUP_EPOCHS": 5,
    "MODEL.CONTRAST_MOMENTUM": 0.99, "MODEL.CONTRAST_TEMPERATURE": 0.2, "MODEL.CONTRAST_NUM_NEGATIVE": 4096,
}  # fmt: skip
RESNET_BYOL = {  # the original's byol_resnet50.yaml
    "TRAIN.OPTIMIZER.NAME": "lars", "TRAIN.OPTIMIZER.TRUST_COEFFICIENT": 1e-3, "TRAIN.OPTIMIZER.MOMENTUM": 0.9,
    "TRAIN.BASE_LR": 0.4, "TRAIN.WEIGHT_DECAY": 1e-6, "TRAIN.EPOCHS": 300, "TRAIN.WARMUP_EPOCHS": 10,
    "MODEL.CONTRAST_MOMENTUM": 0.996,
}  # fmt: skip

EXPECTED = {
    "moby_swin_tiny": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION},
    "moby_swin_small": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION},
    "moby_swin_base": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION},
    "moby_vit_tiny": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION},
    "moby_vit_small": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION},
    "moby_vit_base": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION},
    "byol_swin_tiny": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION},
    "byol_swin_small": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION},
    "byol_swin_base": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION},
    "byol_vit_tiny": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION},
    "byol_vit_small": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION},
    "byol_vit_base": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION},
    "synco_swin_tiny": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION, **SYNCO_COUNTS},
    "synco_swin_small": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION, **SYNCO_COUNTS},
    "synco_swin_base": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION, **SYNCO_COUNTS},
    "synco_vit_tiny": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION, **SYNCO_COUNTS},
    "synco_vit_small": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION, **SYNCO_COUNTS},
    "synco_vit_base": {**DROP_PATH_AND_STOP_GRAD, **AUGMENTATION, **SYNCO_COUNTS},
    "moby_resnet50": {**RESNET_DROP_PATH, **AUGMENTATION, **RESNET_CONTRASTIVE},
    "byol_resnet50": {**RESNET_DROP_PATH, **AUGMENTATION, **RESNET_BYOL},
    "synco_resnet50": {**RESNET_DROP_PATH, **AUGMENTATION, **RESNET_CONTRASTIVE, **SYNCO_COUNTS},
}

CONFIG_FILES = sorted(glob.glob("configs/*.yaml"))


def resolved(cfg_file, key):
    node = get_config(args(cfg=cfg_file))
    for part in key.split("."):
        node = node[part]
    return node


def test_the_table_lists_every_config():
    assert sorted(os.path.basename(f)[: -len(".yaml")] for f in CONFIG_FILES) == sorted(EXPECTED)


@pytest.mark.parametrize("cfg_file", CONFIG_FILES, ids=os.path.basename)
def test_every_config_resolves_to_the_table(cfg_file):
    expected = EXPECTED[os.path.basename(cfg_file)[: -len(".yaml")]]
    found = {key: resolved(cfg_file, key) for key in expected}
    assert found == expected


def name_value(x):
    """How run names write a number: 0.2 -> "02", 0.0 -> "0", 0.996 -> "0996", 4096 -> "4096"."""
    return f"{x:g}".replace(".", "")


@pytest.mark.parametrize("cfg_file", CONFIG_FILES, ids=os.path.basename)
def test_run_name_says_what_runs(cfg_file):
    """Every setting MODEL.NAME spells out is the one the config runs."""
    m = get_config(args(cfg=cfg_file)).MODEL
    framework, encoder, settings = m.NAME.split("__")
    assert (framework, encoder) == (m.TYPE, m.ENCODER)
    tokens = {
        "odpr": name_value(m.ONLINE_DROP_PATH_RATE),
        "tdpr": name_value(m.TARGET_DROP_PATH_RATE),
        "cm": name_value(m.CONTRAST_MOMENTUM),
        "ct": name_value(m.CONTRAST_TEMPERATURE),
        "queue": name_value(m.CONTRAST_NUM_NEGATIVE),
        "proj": name_value(m.PROJ_NUM_LAYERS),
        "pred": name_value(m.PRED_NUM_LAYERS),
    }
    named = settings.split("_")
    assert ("stopgradconv1" in named) == m.STOP_GRAD_CONV1
    for token in named:
        if token != "stopgradconv1":
            prefix = token.rstrip("0123456789")
            assert token == prefix + tokens[prefix], f"{m.NAME}: {token} but the config runs {prefix}{tokens[prefix]}"
    assert {"odpr", "tdpr"} <= {token.rstrip("0123456789") for token in named}


# -----------------------------------------------------------------------------
# Run names follow the effective settings unless the user named the run
# -----------------------------------------------------------------------------


def yaml_name(cfg_file):
    with open(cfg_file) as f:
        return yaml.safe_load(f)["MODEL"]["NAME"]


@pytest.mark.parametrize("cfg_file", CONFIG_FILES, ids=os.path.basename)
def test_shipped_run_names_are_kept_when_nothing_is_overridden(cfg_file):
    assert get_config(args(cfg=cfg_file)).MODEL.NAME == yaml_name(cfg_file)
    assert get_config(args(cfg=cfg_file, opts=["TRAIN.EPOCHS", "7", "DATA.IMG_SIZE", "64"])).MODEL.NAME == yaml_name(
        cfg_file
    )  # settings the name does not spell


@pytest.mark.parametrize(
    "cfg_file, opts, name",
    [
        ("configs/moby_vit_tiny.yaml", ["MODEL.CONTRAST_NUM_NEGATIVE", "64"],
         "moby__vit_tiny__odpr02_tdpr0_cm099_ct02_queue64_proj2_pred2"),
        ("configs/synco_swin_tiny.yaml", ["MODEL.CONTRAST_TEMPERATURE", "0.1", "MODEL.CONTRAST_MOMENTUM", "0.996"],
         "synco__swin_tiny__odpr02_tdpr0_cm0996_ct01_queue4096_proj2_pred2"),
        # the README's variant of the BYOL configs, now without its MODEL.NAME
        ("configs/byol_vit_small.yaml", ["MODEL.ONLINE_DROP_PATH_RATE", "0.0", "MODEL.STOP_GRAD_CONV1", "True"],
         "byol__vit_small__odpr0_tdpr0_stopgradconv1_cm0996_proj2_pred2"),
        ("configs/moby_resnet50.yaml", ["MODEL.ENCODER", "resnet101", "MODEL.PRED_NUM_LAYERS", "3"],
         "moby__resnet101__odpr0_tdpr0_cm099_ct02_queue4096_proj2_pred3"),
        # the encoder-shaping keys, spelled only for the family they shape
        ("configs/moby_vit_tiny.yaml", ["MODEL.VIT.PATCH_SIZE", "8"],
         "moby__vit_tiny__odpr02_tdpr0_patch8_cm099_ct02_queue4096_proj2_pred2"),
        ("configs/byol_resnet50.yaml", ["MODEL.RESNET.CIFAR_STEM", "True"],
         "byol__resnet50__odpr0_tdpr0_cifarstem_cm0996_proj2_pred2"),
        ("configs/moby_swin_tiny.yaml", ["MODEL.VIT.PATCH_SIZE", "8", "MODEL.RESNET.CIFAR_STEM", "True"],
         "moby__swin_tiny__odpr02_tdpr0_cm099_ct02_queue4096_proj2_pred2"),
    ],
)  # fmt: skip
def test_run_name_follows_the_settings_opts_change(cfg_file, opts, name):
    config = get_config(args(cfg=cfg_file, opts=opts, output="runs", tag="t"))
    assert config.MODEL.NAME == name and config.OUTPUT == f"runs/{name}/t"


def test_a_name_the_user_gave_is_kept(tmp_path):
    queue = ["MODEL.CONTRAST_NUM_NEGATIVE", "64"]
    assert get_config(args(cfg="configs/moby_vit_tiny.yaml", opts=[*queue, "MODEL.NAME", "mine"])).MODEL.NAME == "mine"
    assert get_config(args(cfg="configs/moby_vit_tiny.yaml", opts=["MODEL.NAME", "mine", *queue])).MODEL.NAME == "mine"
    own = tmp_path / "own.yaml"  # a name that is not the pattern's for the file's settings
    own.write_text(f"BASE: ['{os.path.abspath('configs/moby_vit_tiny.yaml')}']\nMODEL:\n  NAME: my_run\n")
    assert get_config(args(cfg=str(own), opts=queue)).MODEL.NAME == "my_run"
    # an original-style name whose settings differ from the file's (odpr0 while 0.2 runs) is the user's too
    stale = tmp_path / "stale.yaml"
    stale.write_text(
        f"BASE: ['{os.path.abspath('configs/moby_vit_tiny.yaml')}']\n"
        "MODEL:\n  NAME: moby__vit_tiny__odpr0_tdpr0_cm099_ct02_queue4096_proj2_pred2\n"
    )
    assert get_config(args(cfg=str(stale), opts=queue)).MODEL.NAME.startswith("moby__vit_tiny__odpr0_")
    unnamed = tmp_path / "unnamed.yaml"
    unnamed.write_text("MODEL:\n  TYPE: byol\n  ENCODER: vit_tiny\n")
    assert get_config(args(cfg=str(unnamed))).MODEL.NAME == "byol__vit_tiny__odpr01_tdpr0_cm099_proj2_pred2"


# -----------------------------------------------------------------------------
# SynCo's window: its keys and their original names
# -----------------------------------------------------------------------------


def window(config):
    return config.MODEL.SYNTHETIC_START_EPOCH, config.MODEL.SYNTHETIC_END_EPOCH


def test_synco_window_keys_and_their_original_names_in_opts():
    base = args(cfg="configs/synco_vit_tiny.yaml")
    assert window(get_config(base)) == (30, 100)
    new = ["MODEL.SYNTHETIC_START_EPOCH", "5", "MODEL.SYNTHETIC_END_EPOCH", "9"]
    old = ["MODEL.WARMUP_EPOCHS", "5", "MODEL.COOLDOWN_EPOCHS", "9"]
    assert window(get_config(args(cfg=base.cfg, opts=new))) == (5, 9)
    assert window(get_config(args(cfg=base.cfg, opts=old))) == (5, 9)
    assert get_config(args(cfg=base.cfg, opts=old)).TRAIN.WARMUP_EPOCHS == 5  # TRAIN's own key is untouched
    assert window(get_config(args(cfg=base.cfg, opts=[*old, "MODEL.SYNTHETIC_START_EPOCH", "5"]))) == (5, 9)
    with pytest.raises(ConfigError, match="MODEL.WARMUP_EPOCHS 5 and MODEL.SYNTHETIC_START_EPOCH 6"):
        get_config(args(cfg=base.cfg, opts=[*old, "MODEL.SYNTHETIC_START_EPOCH", "6"]))


def test_an_original_config_with_the_old_names_loads_and_means_the_same(tmp_path):
    original = tmp_path / "synco_original.yaml"  # the original's keys, as its configs/synco_*.yaml set them
    original.write_text(
        "MODEL:\n  TYPE: synco\n  ENCODER: swin_tiny\n  NAME: synco__swin_tiny\n  N_HARD: 256\n"
        "  WARMUP_EPOCHS: 20\n  COOLDOWN_EPOCHS: 80\nTRAIN:\n  WARMUP_EPOCHS: 5\n"
    )
    config = get_config(args(cfg=str(original)))
    assert window(config) == (20, 80) and config.TRAIN.WARMUP_EPOCHS == 5
    assert config.MODEL.NAME == "synco__swin_tiny"  # its folder name too
    child = tmp_path / "child.yaml"  # a file may override its base's old name with the new one
    child.write_text("BASE: ['synco_original.yaml']\nMODEL:\n  SYNTHETIC_START_EPOCH: 25\n")
    assert window(get_config(args(cfg=str(child)))) == (25, 80)
    both = tmp_path / "both.yaml"
    both.write_text("MODEL:\n  TYPE: synco\n  COOLDOWN_EPOCHS: 80\n  SYNTHETIC_END_EPOCH: 90\n")
    with pytest.raises(ConfigError, match="both.yaml: MODEL.COOLDOWN_EPOCHS 80 and MODEL.SYNTHETIC_END_EPOCH 90"):
        get_config(args(cfg=str(both)))


# -----------------------------------------------------------------------------
# Warnings for settings that silently do nothing
# -----------------------------------------------------------------------------


def warnings_for(cfg_file, opts, pretraining=True):
    return inert_settings(get_config(args(cfg=cfg_file, opts=opts)), pretraining)


@pytest.mark.parametrize("cfg_file", CONFIG_FILES, ids=os.path.basename)
def test_shipped_configs_warn_of_nothing(cfg_file):
    assert warnings_for(cfg_file, []) == []


def test_warm_up_as_long_as_the_run_is_a_warning():
    (line,) = warnings_for("configs/moby_vit_tiny.yaml", ["TRAIN.EPOCHS", "5"])
    assert line.startswith("TRAIN.WARMUP_EPOCHS 5 >= TRAIN.EPOCHS 5: the learning rate never leaves")
    (line,) = warnings_for("configs/moby_vit_tiny.yaml", ["TRAIN.EPOCHS", "3"], pretraining=False)  # a probe too
    assert "TRAIN.WARMUP_EPOCHS 5 >= TRAIN.EPOCHS 3" in line
    assert warnings_for("configs/moby_vit_tiny.yaml", ["TRAIN.EPOCHS", "6"]) == []


@pytest.mark.parametrize(
    "opts, outside",
    [
        (["TRAIN.EPOCHS", "30"], True),  # starts at 30: epochs 0..29 never reach it
        (["TRAIN.EPOCHS", "31"], False),  # epoch 30 has them
        (["MODEL.WARMUP_EPOCHS", "50", "MODEL.COOLDOWN_EPOCHS", "40"], True),  # an empty window
        (["MODEL.SYNTHETIC_END_EPOCH", "-1", "MODEL.SYNTHETIC_START_EPOCH", "-5"], True),
        (["MODEL.SYNTHETIC_START_EPOCH", "299", "MODEL.SYNTHETIC_END_EPOCH", "400"], False),  # the last epoch
    ],
)
def test_synthetic_negatives_outside_the_run_are_a_warning(opts, outside):
    lines = warnings_for("configs/synco_vit_tiny.yaml", ["TRAIN.WARMUP_EPOCHS", "0", *opts])
    assert len(lines) == outside
    if outside:
        assert "synthetic negatives never switch on" in lines[0] and "this run is MoBY" in lines[0]
    # not SynCo, or not pretraining: the window means nothing
    assert warnings_for("configs/synco_vit_tiny.yaml", ["TRAIN.WARMUP_EPOCHS", "0", *opts], pretraining=False) == []
    assert warnings_for("configs/moby_vit_tiny.yaml", ["TRAIN.WARMUP_EPOCHS", "0", *opts]) == []


def test_no_synthetic_negatives_of_any_kind_is_a_warning():
    zero = [item for i in range(1, 7) for item in (f"MODEL.N{i}", "0")]
    (line,) = warnings_for("configs/synco_vit_tiny.yaml", zero)
    assert "N1..N6 are all 0" in line
    assert warnings_for("configs/synco_vit_tiny.yaml", zero[:-1] + ["1"]) == []
