"""tools/export_backbone.py: the exported backbone, loaded into timm as printed, gives the encoder's features
(a Swin's to within 1e-4: timm's Swin LayerNorms have eps 1e-5 where the encoder has the original's)."""

import os

import pytest
import timm
import torch
from conftest import SWIN_T, perturbed, run_script, to_original_layout
from safetensors.torch import load_file

from config import get_config
from models import build_model
from models.build import ENCODERS
from models.swin_transformer import swin_tiny
from models.vision_transformer import vit_small, vit_tiny
from tools import export_backbone

OFFLINE = {"HF_HUB_OFFLINE": "1"}


def write_pretrain_checkpoint(path, encoder):
    """A checkpoint as main_pretrain.save_checkpoint writes it; returns its online encoder (eval mode)."""
    config = get_config()
    config.defrost()
    small_heads = ["MODEL.PROJ_HIDDEN_DIM", 32, "MODEL.PROJ_DIM", 16, "MODEL.CONTRAST_NUM_NEGATIVE", 8]
    config.merge_from_list(["MODEL.TYPE", "moby", "MODEL.ENCODER", encoder, "DATA.IMG_SIZE", 224, *small_heads])
    config.freeze()
    torch.manual_seed(0)
    model = build_model(config)
    perturbed(model.encoder)
    for name, buffer in model.encoder.named_buffers():  # BatchNorm statistics, as after training
        if name.endswith(("running_mean", "running_var")):
            buffer.uniform_(0.5, 1.5)
    state = {
        "model": model.state_dict(),
        "optimizer": {},
        "lr_scheduler": {},
        "scaler": {},
        "epoch": 3,
        "framework": {"type": "moby", "encoder": encoder},
        "config": config.dump(),
    }
    torch.save(state, path)
    return model.encoder


@pytest.fixture
def offline_timm(monkeypatch):
    """timm with every download path of its weight loader made an error."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)

    def no_download(*args, **kwargs):
        raise AssertionError("timm tried to download weights")

    for fn in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file", "load_custom_from_hf"):
        monkeypatch.setattr(timm.models._builder, fn, no_download)


# max |timm's features - the encoder's|: the same computation for a ViT (and the same module for a
# ResNet); for a Swin, timm's LayerNorm eps (1e-5 everywhere) against the original's (1e-6 but in
# norm2) moves them by ~1e-5
FEATURE_ATOL = {"vit": 1e-5, "swin": 1e-4, "resnet": 0.0}


def assert_same_backbone(model, encoder, stem, img_size):
    exported = load_file(f"{stem}.safetensors")
    pth = torch.load(f"{stem}.pth", weights_only=True)
    assert pth.keys() == exported.keys() and all(torch.equal(pth[k], v) for k, v in exported.items())
    model.eval().load_state_dict(exported)  # strict: no missing or unexpected keys
    x = torch.randn(2, 3, img_size, img_size)
    family = "swin" if "layers.0.blocks.0.norm1.weight" in exported else "vit" if "cls_token" in exported else "resnet"
    atol = FEATURE_ATOL[family]
    with torch.no_grad():
        torch.testing.assert_close(model(x), encoder.eval()(x), rtol=0, atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("encoder, timm_name", [("vit_tiny", "vit_tiny_patch16_224"),
                                               ("swin_tiny", "swin_tiny_patch4_window7_224"),
                                               ("resnet50", "resnet50")])  # fmt: skip
def test_exported_backbone_gives_encoder_features(tmp_path, offline_timm, encoder, timm_name):
    checkpoint = tmp_path / "checkpoint.pth"
    online = write_pretrain_checkpoint(checkpoint, encoder)
    stem = str(tmp_path / "backbone")
    result = run_script(["tools/export_backbone.py", str(checkpoint), stem], env=OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    *_, message, call = result.stdout.strip().splitlines()
    assert ("within 1e-4" in message) == encoder.startswith("swin"), message
    expected = f"timm.create_model('{timm_name}', num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file="
    assert call.startswith(f"{expected}'{stem}.safetensors'"), call
    assert_same_backbone(eval(call, {"timm": timm}), online, stem, 224)  # the printed line, verbatim


def test_vit_small_needs_its_12_heads(tmp_path, offline_timm):
    """MoCo v3's ViT-S: timm's vit_small_patch16_224 has the same weights but 6 heads, other features."""
    torch.manual_seed(0)
    encoder = perturbed(vit_small(img_size=224))
    checkpoint = tmp_path / "checkpoint.pth"
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    torch.save({"model": state, "framework": {"type": "byol", "encoder": "vit_small"}}, checkpoint)
    primary, name, call = export_backbone.export(str(checkpoint), str(tmp_path / "vit"))
    assert "num_heads=12" in call
    assert_same_backbone(eval(call, {"timm": timm}), encoder, str(tmp_path / "vit"), 224)
    with torch.device("meta"):
        six_heads = timm.create_model("vit_small_patch16_224", num_classes=0).eval()
    six_heads.load_state_dict(load_file(primary), assign=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert not torch.allclose(six_heads(x), encoder(x), atol=1e-3)


def test_original_checkpoint_exports(tmp_path, offline_timm):
    """A checkpoint of the original code: original Swin layout, no "framework" entry, no DATA config."""
    torch.manual_seed(0)
    encoder = perturbed(swin_tiny(img_size=224))
    original = {f"encoder.{k}": v for k, v in to_original_layout(encoder.state_dict(), **SWIN_T).items()}
    checkpoint = tmp_path / "ckpt_epoch_99.pth"
    torch.save({"model": {**original, "queue_ptr": torch.zeros(1)}, "optimizer": {}, "epoch": 99, "config": {}},
               checkpoint)  # fmt: skip
    out = str(tmp_path / "swin.pth")  # the .pth is the one loaded, the .safetensors is written beside it
    primary, name, call = export_backbone.export(str(checkpoint), out)
    assert (primary, name) == (out, "swin_tiny")
    assert call == (
        "timm.create_model('swin_tiny_patch4_window7_224', num_classes=0, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='{out}'))"
    )
    assert_same_backbone(eval(call, {"timm": timm}), encoder, str(tmp_path / "swin"), 224)


@pytest.mark.parametrize("img_size", [224, 64])
@pytest.mark.parametrize("name", list(ENCODERS))
def test_timm_call_fits_every_encoder(name, img_size):
    """The printed arguments build a timm model with exactly the encoder's keys and shapes."""
    with torch.device("meta"):
        state = ENCODERS[name](img_size=img_size).state_dict()
    model_name, kwargs = export_backbone.timm_call(name, img_size, "b.safetensors")
    export_backbone.check_against_timm(state, model_name, kwargs)  # raises on any difference
    call = export_backbone.format_call(model_name, kwargs)
    assert ("num_heads=12" in call) == (name == "vit_small"), call  # MoCo v3's ViT-S; timm's has 6
    if name.startswith("vit"):  # the default tags: a .npz loader, Inception normalisation
        assert "custom_load=False" in call or name == "vit_base", call
        assert "mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)" in call, call
    if img_size == 64:
        assert ("img_size=64" in call) != name.startswith("resnet"), call  # a ResNet takes any size
        assert "input_size=(3, 64, 64)" in call, call
        assert ("window_size=((4, 4), (4, 4), (4, 4), (2, 2))" in call) == name.startswith("swin"), call
    else:
        assert "img_size" not in call and "window_size" not in call, call


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200"])
def test_resnet_depth_inferred_without_framework_entry(name):
    """The original's checkpoints name no encoder: the blocks per stage and their kind tell the depth
    (ResNet-34 and ResNet-50 both have 3, 4, 6, 3 blocks)."""
    with torch.device("meta"):
        state = ENCODERS[name]().state_dict()
    assert export_backbone.infer_encoder_name(state) == name


def test_a_patch_4_vit_exports_with_its_patch_size(tmp_path, offline_timm):
    """A CIFAR ViT-T/4 at 32 px, its size read from the position table when the checkpoint has no config."""
    torch.manual_seed(0)
    encoder = perturbed(vit_tiny(img_size=32, patch_size=4))
    checkpoint = tmp_path / "checkpoint.pth"
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    torch.save({"model": state, "framework": {"type": "moby", "encoder": "vit_tiny"}}, checkpoint)
    _, _, call = export_backbone.export(str(checkpoint), str(tmp_path / "vit"))
    assert "patch_size=4, img_size=32" in call and "input_size=(3, 32, 32)" in call
    assert_same_backbone(eval(call, {"timm": timm}), encoder, str(tmp_path / "vit"), 32)


def test_a_resnet_with_the_cifar_stem_is_refused(tmp_path):
    with torch.device("meta"):
        encoder = ENCODERS["resnet18"](cifar_stem=True)
    checkpoint = tmp_path / "checkpoint.pth"
    state = {f"encoder.{k}": torch.zeros(v.shape) for k, v in encoder.state_dict().items()}
    torch.save({"model": state, "framework": {"type": "byol", "encoder": "resnet18"}}, checkpoint)
    with pytest.raises(export_backbone.ExportError, match="CIFAR stem .* which no timm model has"):
        export_backbone.export(str(checkpoint), str(tmp_path / "resnet"))
    assert not os.path.exists(tmp_path / "resnet.safetensors")


@pytest.mark.slow
def test_errors_are_one_line(tmp_path, capsys):
    missing = run_script(["tools/export_backbone.py", str(tmp_path / "none.pth"), str(tmp_path / "out")])
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [f"error: no checkpoint at {tmp_path / 'none.pth'}"]

    heads = tmp_path / "heads.pth"
    torch.save({"model": {"projector.linear1.weight": torch.zeros(2, 2)}}, heads)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    cases = [
        (heads, [], "has no encoder.* weights"),
        (garbage, [], "unreadable checkpoint"),
        (heads, ["--encoder-prefix", "projector."], "match no known encoder"),
    ]
    for path, options, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            export_backbone.main([str(path), str(tmp_path / "out"), *options])
        assert exit_info.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ") and message in line, line
    assert not os.path.exists(tmp_path / "out.safetensors")
