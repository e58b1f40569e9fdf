"""Reading a checkpoint never runs code: only tensors, plain containers and the original
code's yacs config are unpickled; anything else is refused with one line, unless trusted."""

import logging
import os
from collections import OrderedDict
from fractions import Fraction

import pytest
import torch
from conftest import SWIN_T, perturbed, run_script, save_code_running_checkpoint, small_config, to_original_layout
from yacs.config import CfgNode

import eval_knn
import main_linear
import main_pretrain
from checkpoint import Checkpointer, UnsafeCheckpointError, newest_checkpoint, read_checkpoint
from config import get_config
from distributed import DistEnv
from lr_scheduler import build_scheduler
from main_linear import build_classifier
from models import build_model
from models.swin_transformer import swin_tiny
from models.vision_transformer import vit_tiny
from monitor import Monitors, OnlineLinear
from optimizer import build_optimizer
from pretrained import load_pretrained_encoder
from tools import export_backbone

LOGGER = logging.getLogger("test_checkpoint_safety")


def assert_refused(error, *names):
    message = str(error)
    assert "\n" not in message and message.startswith("refused to load "), message
    assert "--trust-checkpoint" in message and all(name in message for name in names), message


@pytest.mark.parametrize("legacy_format", [False, True])
def test_code_running_checkpoint_is_refused_and_nothing_runs(tmp_path, legacy_format):
    path, marker = tmp_path / "ckpt.pth", tmp_path / "marker"
    save_code_running_checkpoint(path, marker, legacy_format)
    with pytest.raises(UnsafeCheckpointError) as error:
        read_checkpoint(str(path))
    assert_refused(error.value, str(path), "exec")
    assert not marker.exists()


@pytest.mark.slow
def test_every_reader_refuses_it(tmp_path):
    """main_linear.py and eval_knn.py (the pretrained encoder), auto-resume, export_backbone.py."""
    marker = tmp_path / "marker"
    save_code_running_checkpoint(tmp_path / "checkpoint.pth", marker)
    classifier = build_classifier(small_config("moby"), num_classes=3, freeze=True)
    with pytest.raises(UnsafeCheckpointError) as error:
        load_pretrained_encoder(classifier, str(tmp_path / "checkpoint.pth"), "vit_tiny")
    assert_refused(error.value, "builtins.exec")
    with pytest.raises(UnsafeCheckpointError):  # a refused file is never skipped for an older one
        newest_checkpoint(str(tmp_path), LOGGER)

    result = run_script(["tools/export_backbone.py", str(tmp_path / "checkpoint.pth"), str(tmp_path / "out")])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    assert_refused(line[len("error: ") :], "builtins.exec")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("optimizer, schedule", [("adamw", "cosine"), ("lars", "step")])
def test_our_checkpoints_load_as_they_are(tmp_path, optimizer, schedule):
    """What main_pretrain.py saves after an epoch, after a real step with a grad scaler."""
    config = small_config("synco", OUTPUT=str(tmp_path), TRAIN__OPTIMIZER__NAME=optimizer,
                          TRAIN__LR_SCHEDULER__NAME=schedule)  # fmt: skip
    model = build_model(config, steps_per_epoch=4)
    opt = build_optimizer(config, model)
    sched = build_scheduler(config, opt, 4)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    x = torch.randn(4, 3, 32, 32)
    out = model(x, x.flip(-1))
    scaler.scale(out["loss"]).backward()
    scaler.step(opt)
    scaler.update()
    sched.step_update(1)
    linear = OnlineLinear(model.encoder.num_features, 3, 0.1, DistEnv(), seed=0)
    linear.step(out["features"], torch.tensor([0, 1, 2, 0]))  # an optimizer state to save
    monitors = Monitors(config, LOGGER, 3, linear=linear)
    checkpointer = Checkpointer(DistEnv(), LOGGER)
    state = main_pretrain.training_state(config, model, opt, sched, scaler, monitors, epoch=0)
    checkpointer.save(state, main_pretrain.checkpoint_paths(config, epoch=0))
    path = checkpointer.last_good
    ckpt = read_checkpoint(path)
    assert ckpt["config"] == config.dump() and ckpt["lr_scheduler"] == sched.state_dict()
    assert ckpt["scaler"] == scaler.state_dict() and ckpt["epoch"] == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ckpt["model"].items())
    restored = build_optimizer(config, model)
    restored.load_state_dict(ckpt["optimizer"])  # the state round-trips
    again = Monitors(config, LOGGER, 3, linear=OnlineLinear(model.encoder.num_features, 3, 0.1, DistEnv(), seed=1))
    again.load_state_dict(ckpt["monitor"])
    assert all(torch.equal(a, b) for a, b in zip(again.linear.head.state_dict().values(),
                                                  linear.head.state_dict().values(), strict=True))  # fmt: skip
    assert again.linear.optimizer.state_dict()["state"].keys() == linear.optimizer.state_dict()["state"].keys()


def original_config():
    """A frozen yacs config shaped like the original code's (nested nodes, a tuple, None, lists)."""
    config = CfgNode(new_allowed=True)
    config.BASE = [""]
    config.DATA = CfgNode({"BATCH_SIZE": 64, "IMG_SIZE": 224, "DATASET": "imagenet"})
    config.MODEL = CfgNode({"TYPE": "synco", "ENCODER": "swin_tiny", "N_HARD": 256})
    config.TRAIN = CfgNode({"EPOCHS": 300, "OPTIMIZER": CfgNode({"NAME": "adamw", "BETAS": (0.9, 0.999)})})
    config.AUG = CfgNode({"CUTMIX_MINMAX": None, "SSL_AUG": True})
    config.freeze()
    return config


def test_original_checkpoint_with_its_config_loads_and_exports(tmp_path):
    """The original's save: model, optimizer, lr_scheduler, max_accuracy, epoch, config, amp."""
    torch.manual_seed(0)
    encoder = perturbed(swin_tiny(img_size=224))
    model = {f"encoder.{k}": v for k, v in to_original_layout(encoder.state_dict(), **SWIN_T).items()}
    model["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    param = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([param])
    param.sum().backward()
    optimizer.step()
    path = tmp_path / "ckpt_epoch_299.pth"
    torch.save({"model": model, "optimizer": optimizer.state_dict(),
                "lr_scheduler": build_scheduler(get_config(), optimizer, 10).state_dict(),
                "max_accuracy": 0.0, "epoch": 299, "config": original_config(),
                "amp": OrderedDict(loss_scaler0={"loss_scale": 65536.0, "unskipped": 0})}, path)  # fmt: skip

    ckpt = read_checkpoint(str(path))  # no trust needed
    config = ckpt["config"]  # its keys and values, as plain OrderedDicts: no CfgNode is built
    assert type(config) is OrderedDict and type(config["TRAIN"]["OPTIMIZER"]) is OrderedDict
    assert config == original_config() and config["TRAIN"]["OPTIMIZER"]["BETAS"] == (0.9, 0.999)
    assert ckpt["amp"]["loss_scaler0"]["loss_scale"] == 65536.0 and ckpt["epoch"] == 299
    primary, name, _ = export_backbone.export(str(path), str(tmp_path / "swin"))  # reads DATA.IMG_SIZE
    assert name == "swin_tiny" and os.path.isfile(primary)


def test_trusted_file_loads_with_the_opt_in(tmp_path):
    path, marker = tmp_path / "foreign.pth", tmp_path / "marker"
    torch.save({"model": {"encoder.pos_embed": torch.zeros(1, 5, 8)}, "ratio": Fraction(1, 3)}, path)
    with pytest.raises(UnsafeCheckpointError) as error:
        read_checkpoint(str(path))
    assert_refused(error.value, "fractions.Fraction")
    assert read_checkpoint(str(path), trust=True)["ratio"] == Fraction(1, 3)

    save_code_running_checkpoint(tmp_path / "runs_code.pth", marker)
    read_checkpoint(str(tmp_path / "runs_code.pth"), trust=True)  # a full unpickle: what the refusal prevents
    assert marker.read_text() == "ran"


def test_the_opt_in_flag_of_every_script(tmp_path, capsys):
    argv = ["--cfg", "configs/moby_vit_tiny.yaml"]
    for parse in (main_pretrain.parse_option, main_linear.parse_option, eval_knn.parse_option):
        assert not get_config(parse(argv)).TRUST_CHECKPOINT
        assert get_config(parse([*argv, "--trust-checkpoint"])).TRUST_CHECKPOINT

    encoder = vit_tiny(img_size=32)
    path = tmp_path / "foreign.pth"
    torch.save({"model": {f"encoder.{k}": v for k, v in encoder.state_dict().items()}, "note": Fraction(1, 3)}, path)
    with pytest.raises(SystemExit):
        export_backbone.main([str(path), str(tmp_path / "out")])
    assert "fractions.Fraction" in capsys.readouterr().err
    export_backbone.main([str(path), str(tmp_path / "out"), "--trust-checkpoint"])
    assert os.path.isfile(tmp_path / "out.safetensors")
