"""AnySizeEncoder: backbones fed other input sizes than they were built for (image retrieval)."""

import pytest
import torch

from models.input_size import AnySizeEncoder, crop_bias_table
from models.swin_transformer import swin_tiny
from models.vision_transformer import vit_tiny


def test_vit_copy_is_the_vit_built_at_that_size():
    torch.manual_seed(0)
    backbone = vit_tiny(img_size=32).eval()
    encoder = AnySizeEncoder(backbone)
    assert encoder.input_size(50, 20) == (48, 16) and encoder.input_size(5, 40) == (16, 48)  # a tie: the larger
    images = torch.randn(2, 3, 48, 32)
    built = vit_tiny(img_size=(48, 32)).eval()
    state = {k: v for k, v in backbone.state_dict().items() if k != "pos_embed"}
    built.load_state_dict(state, strict=False)  # its own sin-cos embedding of the 3 x 2 grid
    with torch.no_grad():
        assert torch.allclose(encoder(images), built(images), atol=1e-6)
        same = torch.randn(2, 3, 32, 32)
        assert torch.equal(encoder(same), backbone(same))  # the built size: the backbone itself
    assert backbone.pos_embed.shape == (1, 5, 192)  # the backbone is left as it was
    with pytest.raises(ValueError, match="nearest"):
        encoder(torch.randn(1, 3, 40, 32))


@pytest.mark.parametrize(
    "build, size, own",
    [
        (lambda: vit_tiny(img_size=32), (48, 16), "pos_embed"),
        (lambda: swin_tiny(img_size=64), (64, 32), "relative_position_bias_table"),
    ],
)
def test_copies_share_the_backbones_weights_and_leave_it_as_it_was(build, size, own):
    torch.manual_seed(0)
    backbone = build().eval()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    encoder = AnySizeEncoder(backbone)
    with torch.no_grad():
        encoder(torch.randn(1, 3, *size))
    built = backbone.state_dict()
    copied = encoder._copies[size].state_dict()
    assert copied.keys() == built.keys()
    not_shared = [k for k, v in copied.items() if v.data_ptr() != built[k].data_ptr()]
    assert not_shared and all(k.endswith(own) for k in not_shared)  # only what the size changes
    assert all(torch.equal(before[k], built[k]) for k in before)  # the backbone is as it was
    with torch.no_grad():  # a weight changed in the backbone is changed in the copy
        backbone.norm.weight.mul_(2)
    assert torch.equal(encoder._copies[size].norm.weight, backbone.norm.weight)


def test_bias_table_crop_keeps_the_offsets_of_the_smaller_window():
    # window (3, 3): row (dh + 2) * 5 + (dw + 2) holds the offset (dh, dw)
    offsets = torch.tensor([[dh, dw] for dh in range(-2, 3) for dw in range(-2, 3)], dtype=torch.float32)
    cropped = crop_bias_table(offsets, (3, 3), (2, 1))
    assert cropped.tolist() == [[-1, 0], [0, 0], [1, 0]]  # |dh| < 2, dw = 0, in the index order
    with pytest.raises(ValueError, match="lacks"):
        crop_bias_table(offsets, (3, 3), (4, 3))


def test_swin_copy_has_the_built_biases_and_runs_as_a_swin_built_at_that_size():
    torch.manual_seed(0)
    backbone = swin_tiny(img_size=64).eval()  # windows 4, 4, 4, 2
    encoder = AnySizeEncoder(backbone)
    assert encoder.input_size(70, 40) == (64, 32)
    images = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        feats = encoder(images)
    copy = encoder._copies[(64, 32)]
    # stage 3: 4 x 2 map, window (4, 2): the biases between its tokens are the built (4, 4) window's
    built_attn, copy_attn = backbone.layers[2].blocks[0].attn, copy.layers[2].blocks[0].attn
    assert (built_attn.window_size, copy_attn.window_size) == ((4, 4), (4, 2))
    tokens = torch.tensor([r * 4 + c for r in range(4) for c in range(2)])
    full = built_attn._get_rel_pos_bias()[0]  # [heads, 16, 16]
    assert torch.equal(full[:, tokens][:, :, tokens], copy_attn._get_rel_pos_bias()[0])
    # shifts, masks and resolutions: those of a Swin built at 64 x 32 (the same windows there)
    built = swin_tiny(img_size=(64, 32)).eval()
    built.load_state_dict(copy.state_dict())
    with torch.no_grad():
        assert torch.allclose(feats, built(images), atol=1e-5)


def test_swin_sides_are_the_nearest_its_windows_tile():
    with torch.device("meta"):
        backbone = swin_tiny(img_size=224)  # windows 7
    encoder = AnySizeEncoder(backbone)
    assert encoder.input_size(224, 168) == (224, 160)  # 160: stage maps 40, 20, 10, 5, windows 5
    # 352 would leave a 22-wide stage-3 map with 2-wide windows; 320 and 384 are as near: the larger
    assert encoder.input_size(352, 20) == (384, 32)
