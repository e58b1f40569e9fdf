"""DAVIS 2017 label propagation: its parts on cases worked out by hand, tracking on a fixture of
moving squares in DAVIS's on-disk layout, the feature maps of each backbone, and a real run of
eval_video_segmentation.py."""

import glob
import math
import os
import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_script, small_config
from PIL import Image

import eval_video_segmentation
from checkpoint import save_atomic
from cli import run_cli
from data.davis import davis_root, read_videos
from evaluation.davis_metrics import score_frame, summarize
from evaluation.video_segmentation import (
    LabelPropagation,
    PropagationSettings,
    first_frame_labels,
    labels_to_mask,
    neighborhood_mask,
    propagate,
    resized_frame_size,
    segment_video,
)
from models import build_encoder, build_model
from models.patch_features import PatchFeatures
from models.swin_transformer import _swin

# DAVIS's palette starts black, dark red, dark green, ...
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (768 - 12)
RED, GREEN = (255, 0, 0), (0, 255, 0)


# -----------------------------------------------------------------------------
# A DAVIS fixture: squares moving one 16-pixel cell per frame
# -----------------------------------------------------------------------------


def moving_squares(height, width, squares, frames=4):
    """Frames [H, W, 3] uint8 and masks [H, W] uint8 of 32 x 32 squares on black.
    squares: (object id, colour, top, left, columns moved per frame)."""
    images, masks = [], []
    for t in range(frames):
        image = np.zeros((height, width, 3), dtype=np.uint8)
        mask = np.zeros((height, width), dtype=np.uint8)
        for object_id, colour, top, left, step in squares:
            x = left + step * t
            image[top : top + 32, x : x + 32] = colour
            mask[top : top + 32, x : x + 32] = object_id
        images.append(image)
        masks.append(mask)
    return images, masks


def write_davis(root, videos, split="val"):
    """DAVIS's layout under ``root`` (a DATA.TRANSFER_ROOT): JPEG frames, palette PNG masks, the list."""
    davis = os.path.join(root, "DAVIS")
    os.makedirs(os.path.join(davis, "ImageSets", "2017"), exist_ok=True)
    with open(os.path.join(davis, "ImageSets", "2017", f"{split}.txt"), "w") as f:
        f.write("".join(f"{name}\n" for name in videos))
    for name, (images, masks) in videos.items():
        for kind in ("JPEGImages", "Annotations"):
            os.makedirs(os.path.join(davis, kind, "480p", name), exist_ok=True)
        for t, (image, mask) in enumerate(zip(images, masks)):
            # 4:4:4 at quality 100: uniform 8 x 8 blocks decode to (almost exactly) their colour
            Image.fromarray(image).save(os.path.join(davis, "JPEGImages", "480p", name, f"{t:05d}.jpg"),
                                        quality=100, subsampling=0)  # fmt: skip
            png = Image.fromarray(mask)
            png.putpalette(PALETTE)
            png.save(os.path.join(davis, "Annotations", "480p", name, f"{t:05d}.png"))
    return root


class ColourFeatures:
    """A hand-made feature map: each 16 x 16 cell's mean colour (RGB in [0, 1]) and a constant 0.2,
    so black, red and green cells have cosine similarities 0.196 (black-red), 0.038 (red-green)."""

    stride = 16

    def input_size(self, height, width):
        return height // 16 * 16, width // 16 * 16

    def __call__(self, images):
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        rgb = F.avg_pool2d(images * std + mean, 16)  # [B, 3, h, w]
        return torch.cat([rgb, torch.full_like(rgb[:, :1], 0.2)], dim=1)


def track(root, settings):
    """(J&F summary, predicted masks per video) of label propagation with ColourFeatures."""
    objects, predictions = [], {}
    for video in read_videos(davis_root(root), "val"):
        masks = dict(segment_video(video, ColourFeatures(), settings, torch.device("cpu"), nullcontext))
        predictions[video.name] = masks
        ids = video.object_ids()
        frames = [score_frame(masks[t], video.read_mask(t)[0], ids) for t in range(1, len(video.frames) - 1)]
        objects += [tuple(x) for x in np.mean(frames, axis=0)]
    return summarize(objects), predictions


def near_corners(shape, squares, t):
    """[H, W] bool: within 8 pixels (a 16 x 16 window) of a corner of a square at frame t."""
    near = np.zeros(shape, dtype=bool)
    for _, _, top, left, step in squares:
        for y in (top, top + 32):
            for x in (left + step * t, left + step * t + 32):
                near[max(y - 8, 0) : y + 8, max(x - 8, 0) : x + 8] = True
    return near


# Bilinear upsampling rounds a convex corner of an object cell (on the image's side, not along
# its border): around the corner point, the object's label is a * b at a pixel centred at
# fractions a, b = (k + 1/2) / 16, k = 8..15, of the way from the far cell centres, the
# background's 1 - a * b, so the object keeps only the pixels with a * b > 1/2.
CENTRES = (np.arange(8, 16) + 0.5) / 16
LOST_PER_CORNER = int(np.count_nonzero(np.multiply.outer(CENTRES, CENTRES) < 0.5))  # 23 of 64


def test_propagation_tracks_two_moving_squares(tmp_path):
    # red moves right, green left, one cell per frame; at frame 3 they touch (rows 0-31 / 32-63)
    squares = [(1, RED, 0, 0, 16), (2, GREEN, 32, 96, -16)]
    root = write_davis(str(tmp_path), {"squares": moving_squares(64, 128, squares)})
    summary, predictions = track(root, PropagationSettings(short_side=64))
    video = read_videos(davis_root(root), "val")[0]
    # The cells' labels are exact: features are exact per cell (the squares fill whole cells), so a
    # cell's top-5 are cells of its colour (the next best, at cosine 0.196, weighs e^-8 of them).
    # The masks then differ from the annotations only at the rounded corners.
    wrong = [predictions["squares"][t] != video.read_mask(t)[0] for t in range(4)]
    assert not wrong[0].any()
    for t in (1, 2, 3):
        assert not (wrong[t] & ~near_corners((64, 128), squares, t)).any(), t
    # frame 1: 2 rounded corners per square (those on the image's top or bottom border are sharp)
    assert LOST_PER_CORNER == 23 and np.count_nonzero(wrong[1]) == 4 * LOST_PER_CORNER
    # so J >= 1 - 4 * 23 / 1024 = 0.91 per square; F loses the boundary pixels of the corners that
    # are more than 2 pixels (0.008 of the diagonal, rounded up) from the true corner
    assert summary["J-Mean"] > 91 and summary["J&F-Mean"] > 90
    # the first mask held still (no tracking) scores far lower: J 1/3 then 0 for each square
    still = [score_frame(video.read_mask(0)[0], video.read_mask(t)[0], [1, 2]) for t in (1, 2)]
    assert summarize([tuple(x) for x in np.mean(still, axis=0)])["J&F-Mean"] < 30


def test_the_neighbourhood_tells_apart_two_squares_of_one_colour(tmp_path):
    # two red squares 5 cells apart: colour alone cannot tell them apart, distance can
    squares = [(1, RED, 0, 0, 16), (2, RED, 80, 96, -16)]
    root = write_davis(str(tmp_path), {"twins": moving_squares(112, 128, squares)})
    near, predictions = track(root, PropagationSettings(short_side=112, neighborhood=2))
    video = read_videos(davis_root(root), "val")[0]
    for t in (1, 2, 3):
        wrong = predictions["twins"][t] != video.read_mask(t)[0]
        assert not (wrong & ~near_corners((112, 128), squares, t)).any(), t
    assert near["J&F-Mean"] > 90
    # without the restriction every red cell sees the same top-5 red cells, so both squares
    # get one and the same label distribution: one of them is lost (J = F = 0)
    anywhere, _ = track(root, PropagationSettings(short_side=112, neighborhood=0))
    assert anywhere["J&F-Mean"] < 50


# -----------------------------------------------------------------------------
# The parts, by hand
# -----------------------------------------------------------------------------


def test_propagate_takes_the_topk_with_a_softmax_at_the_temperature():
    # three source cells at cosine 1, 0.6 and 0 from the query; labels 0, 1, 1
    sources = torch.tensor([[1.0, 0.6, 0.0], [0.0, 0.8, 1.0]])[None]  # [T=1, D=2, N=3]
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])[None]  # [T=1, C=2, N=3]
    query = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.8, 1.0]])  # [D, N]: cell 0 is (1, 0)
    out = propagate(query, sources, labels, topk=2, temperature=0.1)
    # cell 0: top-2 at 1 and 0.6, weights e^10 and e^6
    assert out[1, 0].item() == pytest.approx(1 / (1 + math.exp(4)), rel=1e-5)
    out = propagate(query, sources, labels, topk=3, temperature=0.1)
    assert out[1, 0].item() == pytest.approx((math.exp(6) + 1) / (math.exp(10) + math.exp(6) + 1), rel=1e-5)
    assert out.sum(dim=0).tolist() == pytest.approx([1, 1, 1])
    # source 0 out of reach of query cell 0: only label 1 remains among its top-2
    allowed = torch.ones(3, 3, dtype=torch.bool)
    allowed[0, 0] = False
    assert propagate(query, sources, labels, topk=2, temperature=0.1, allowed=allowed)[1, 0].item() == 1


def test_neighborhood_mask_is_the_square_window():
    h, w, r = 3, 5, 1
    mask = neighborhood_mask(h, w, r)
    for s in range(h * w):
        for q in range(h * w):
            near = abs(s // w - q // w) <= r and abs(s % w - q % w) <= r
            assert mask[s, q].item() == near


def test_context_is_the_first_frame_and_the_last_n():
    first = torch.randn(4, 2, 3)
    propagation = LabelPropagation(first, torch.ones(2, 2, 3) / 2, PropagationSettings(n_last_frames=2))
    frames = [torch.randn(4, 2, 3) for _ in range(4)]
    for features in frames:
        propagation(features)
    kept = [f for f, _ in propagation.recent]
    assert len(kept) == 2
    assert torch.allclose(kept[0], F.normalize(frames[2].flatten(1), dim=0))
    assert torch.allclose(kept[1], F.normalize(frames[3].flatten(1), dim=0))
    assert torch.allclose(propagation.first[0], F.normalize(first.flatten(1), dim=0))


def test_labels_upsample_rescale_and_argmax():
    labels = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two cells, one label each
    mask = labels_to_mask(labels, frame_size=(16, 32), output_size=(16, 32))
    assert mask[:, :16].eq(0).all() and mask[:, 16:].eq(1).all()
    # label 0 ahead in both cells, but rescaled to [0, 1] each label wins where it is highest
    labels = torch.tensor([[[0.6, 0.5]], [[0.4, 0.5]]])
    mask = labels_to_mask(labels, frame_size=(16, 32), output_size=(8, 16))
    assert mask[:, :8].eq(0).all() and mask[:, 8:].eq(1).all()


def test_first_mask_on_the_grid_is_taken_at_pixel_centres():
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[1, 1], mask[1, 3], mask[3, 3] = 3, 7, 255  # the pixels at the centres of 2 x 2 cells
    mask[0, 0] = 7  # not a centre
    labels = first_frame_labels(mask, [3, 7], (2, 2), "cpu")
    assert labels.argmax(dim=0).tolist() == [[1, 2], [0, 0]]  # 255 (void) is background
    assert labels.sum(dim=0).eq(1).all()


def test_frames_are_resized_as_dino_resizes_them():
    assert resized_frame_size(480, 854, 480) == (480, 832)
    assert resized_frame_size(854, 480, 480) == (832, 480)
    assert resized_frame_size(64, 128, 64) == (64, 128)


# -----------------------------------------------------------------------------
# Feature maps of each backbone
# -----------------------------------------------------------------------------


def test_vit_patch_features_are_the_normalised_last_block_tokens():
    encoder = build_encoder(small_config("moby"), drop_path_rate=0.0).eval()  # vit_tiny at 32 px
    features = PatchFeatures(encoder)
    images = torch.randn(2, 3, 32, 32)
    tokens = encoder.forward_features(images)[:, 1:]  # after the final norm, without the class token
    assert torch.allclose(features(images), tokens.transpose(1, 2).reshape(2, 192, 2, 2), atol=1e-6)
    # another size: a copy for it, the encoder left as it was
    pos_embed = encoder.pos_embed.clone()
    assert features.input_size(50, 90) == (48, 96) and features(torch.randn(1, 3, 48, 96)).shape == (1, 192, 3, 6)
    assert torch.equal(encoder.pos_embed, pos_embed)
    with pytest.raises(ValueError, match="takes no"):
        features(torch.randn(1, 3, 40, 40))


def test_swin_patch_features_are_stage_3():
    # swin_tiny's construction, narrower (its widths take seconds to build): stage 3 is 128-d
    encoder = _swin(32, (2, 2, 2, 2), (1, 2, 4, 8), img_size=64).eval()
    features = PatchFeatures(encoder)
    images = torch.randn(1, 3, 64, 64)
    expected = encoder.layers[:3](encoder.patch_embed(images)).permute(0, 3, 1, 2)
    assert torch.allclose(features(images), expected, atol=1e-5)
    assert features(torch.randn(1, 3, 64, 128)).shape == (1, 128, 4, 8)


def test_resnet_patch_features_are_layer3():
    encoder = build_encoder(small_config("moby", MODEL__ENCODER="resnet50"), 0.0).eval()
    assert PatchFeatures(encoder)(torch.randn(1, 3, 32, 48)).shape == (1, 1024, 2, 3)


@pytest.mark.parametrize(
    "opts, message",
    [({"MODEL__ENCODER": "resnet18", "MODEL__RESNET__CIFAR_STEM": True}, "layer3 at stride 4"),
     ({"MODEL__VIT__PATCH_SIZE": 4}, r"patch \(4, 4\)")],
)  # fmt: skip
def test_no_stride_16_maps_from_the_cifar_backbones(opts, message):
    """A ResNet with the CIFAR stem has layer3 at stride 4, a ViT/4 patches of 4: other grids than
    the stride-16 one label propagation is tuned for."""
    with torch.device("meta"):
        encoder = build_encoder(small_config("moby", **opts), 0.0)
    with pytest.raises(ValueError, match=message):
        PatchFeatures(encoder)


# -----------------------------------------------------------------------------
# eval_video_segmentation.py
# -----------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_video_segmentation_runs_end_to_end(tmp_path):
    squares = [(1, RED, 0, 0, 16), (2, GREEN, 32, 96, -16)]
    root = write_davis(str(tmp_path / "data"), {
        "squares": moving_squares(64, 128, squares),
        "one": moving_squares(64, 128, [(3, GREEN, 16, 16, 16)], frames=3),
    })  # fmt: skip
    # a vit_tiny checkpoint pretrained at 32 px, as pretraining writes it (its config included)
    config = small_config("moby")
    checkpoint = str(tmp_path / "checkpoint.pth")
    framework = {"type": "moby", "encoder": "vit_tiny"}
    state = {"model": build_model(config).state_dict(), "epoch": 0, "framework": framework, "config": config.dump()}
    save_atomic(state, checkpoint)
    result = run_script(["eval_video_segmentation.py", "--cfg", "configs/moby_vit_tiny.yaml",
                         "--output", str(tmp_path / "out"), "--tag", "t", "--opts",
                         "LINEAR_EVAL.PRETRAINED", checkpoint, "DATA.TRANSFER_ROOT", root,
                         "DAVIS.SHORT_SIDE", "64"])  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (folder,) = [Path(p) for p in glob.glob(str(tmp_path / "out" / "*" / "t" / "davis_val"))]
    log = (folder / "log_rank0.txt").read_text()
    assert "DATA.IMG_SIZE: 224 -> 32" in log  # the encoder is built as it was pretrained
    numbers = r"J&F-Mean ([\d.]+) J-Mean ([\d.]+) F-Mean ([\d.]+)"
    line = re.search(r"DAVIS 2017 val \(3 objects in 2 videos\): " + numbers, log)
    assert line, log[-2000:]
    jf, j, f = map(float, line.groups())
    assert 0 <= j <= 100 and 0 <= f <= 100 and jf == pytest.approx((j + f) / 2, abs=0.01)
    for name, frames, ids in (("squares", 4, {1, 2}), ("one", 3, {3})):
        written = sorted(glob.glob(str(folder / name / "*.png")))
        assert [os.path.basename(p) for p in written] == [f"{t:05d}.png" for t in range(frames)]
        for path in written:
            with Image.open(path) as png:
                assert png.mode == "P" and png.size == (128, 64) and png.getpalette()[:12] == PALETTE[:12]
                assert set(np.unique(np.asarray(png))) <= {0} | ids
        first = np.asarray(Image.open(folder / name / "00000.png"))
        annotation = np.asarray(Image.open(os.path.join(root, "DAVIS", "Annotations", "480p", name, "00000.png")))
        assert np.array_equal(first, annotation)
    assert "Sequence,J-Mean,F-Mean" in (folder / "per_object.csv").read_text()


def test_missing_davis_is_one_line_naming_the_layout(tmp_path, capsys):
    argv = ["--cfg", "configs/moby_vit_tiny.yaml", "--output", str(tmp_path / "out"),
            "--opts", "DATA.TRANSFER_ROOT", str(tmp_path / "data")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_cli(eval_video_segmentation.setup, eval_video_segmentation.main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line]
    davis = os.path.join(str(tmp_path / "data"), "DAVIS")
    listing = os.path.join(davis, "ImageSets", "2017", "val.txt")
    assert line.startswith(f"error: DAVIS 2017 is not where DATA.TRANSFER_ROOT points: missing {listing}")
    for path in ("JPEGImages/480p/<video>/<frame>.jpg", "Annotations/480p/<video>/<frame>.png"):
        assert os.path.join(davis, path) in line
    # a listed video without frames is named
    os.makedirs(os.path.join(davis, "ImageSets", "2017"))
    with open(os.path.join(davis, "ImageSets", "2017", "val.txt"), "w") as f:
        f.write("bike\n")
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(davis, "JPEGImages", "480p", "bike"))):
        read_videos(davis, "val")


def test_settings_that_cannot_work_are_one_line(tmp_path, capsys):
    for key, value, message in (
        ("DAVIS.TOPK", "0", "DAVIS.TOPK 0: must be an integer >= 1"),
        ("DAVIS.TEMPERATURE", "0.0", "DAVIS.TEMPERATURE 0.0: must be a number > 0"),
    ):
        argv = ["--cfg", "configs/moby_vit_tiny.yaml", "--output", str(tmp_path), "--opts", key, value]
        with pytest.raises(SystemExit) as exit_info:
            run_cli(eval_video_segmentation.setup, eval_video_segmentation.main, argv)
        assert exit_info.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
