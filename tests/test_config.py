import argparse

import pytest

from config import ConfigError, check_config, get_config


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
    assert config.TRAIN.EPOCHS == 7 and config.AMP_OPT_LEVEL == "O2" and config.MODEL.STOP_GRAD_CONV1
    assert config.OUTPUT == "runs/byol__vit_small__odpr0_tdpr0_cm0996_proj2_pred2/exp"
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


def test_odd_opts_and_unknown_keys_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="pairs"):
        get_config(args(opts=["TRAIN.EPOCHS"]))
    with pytest.raises(ConfigError, match="TRAIN.NOPE"):
        get_config(args(opts=["TRAIN.NOPE", "1"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("BASE: ['missing_base.yaml']\n")
    with pytest.raises(ConfigError, match="missing_base.yaml"):
        get_config(args(cfg=str(bad)))
