"""Image retrieval (revisited Oxford / Paris): the benchmark's AP, the data set read from its
on-disk format, and eval_retrieval.py end to end on a tiny checkpoint.

The fixture holds three "buildings" A, B, C: database images d0, d1 (A), d2, d3 (B), d4, d5 (C)
and queries q0 (A), q1 (B), q2 (C), each a flat colour whose red level names the image, the
queries inside a frame of another colour that only their box leaves out. ``ImageFeatures``
reads that level back and returns a 2-d unit vector at the angle a table gives the image.
"""

import contextlib
import glob
import math
import os
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ROOT, free_port, run_script
from PIL import Image

import eval_retrieval
from cli import run_cli
from data.photometric import IMAGENET_MEAN, IMAGENET_STD
from data.retrieval import RetrievalImages, read_ground_truth
from evaluation.retrieval import (
    MultiScale,
    average_precision,
    protocol_ground_truth,
    rank_database,
    retrieval_features,
    revisited_map,
)
from models.vision_transformer import vit_tiny

DATABASE = [f"d{i}" for i in range(6)]
QUERIES = [f"q{i}" for i in range(3)]
BOX = [16, 16, 48, 48]  # x1, y1, x2, y2 inside an 80 x 64 query image, on JPEG's blocks
FRAME_RED = 240
GND = [  # q0: easy d0, hard d1; q1: easy d2, hard d3; q2: easy d4, junk d5 (lists and arrays, as files hold either)
    {"bbx": BOX, "easy": [0], "hard": [1], "junk": []},
    {"bbx": np.array(BOX, dtype=np.float64), "easy": np.array([2]), "hard": np.array([3]), "junk": np.array([])},
    {"bbx": BOX, "easy": [4], "hard": [], "junk": [5]},
]
# angle (degrees) of each image's feature; queries 3 degrees past their building's first image
PERFECT = {"d0": 0, "d1": 10, "d2": 120, "d3": 130, "d4": 240, "d5": 250, "q0": 3, "q1": 123, "q2": 243}
# d1 <-> d2 and d3 <-> d4 swapped. By angular distance the rankings are
#   q0 (3):   d0 3, d2 7, d5 113, d1 117, d3 123, d4 127
#   q1 (123): d1 3, d4 7, d2 113, d3 117, d0 123, d5 127
#   q2 (243): d3 3, d5 7, d4 113, d0 117, d1 123, d2 127
# Medium: q0 positives d0, d1 at 0, 3: (1 + (1/3 + 2/4) / 2) / 2 = 17/24; q1 d2, d3 at 2, 3:
# ((0 + 1/3) / 2 + (1/3 + 2/4) / 2) / 2 = 7/24; q2 d4 at 2, after junk d5 at 1 is taken out at 1:
# (0 + 1/2) / 2 = 6/24. mAP = 30/72 = 5/12.
# Hard (easy ignored too): q0 d1 at 3 - 1 = 2: (0 + 1/3) / 2 = 1/6; q1 d3 at 3 - 1 = 2: 1/6; q2 has no
# hard positive and is left out. mAP = 1/6.
PERMUTED = {**PERFECT, "d1": 120, "d2": 10, "d3": 240, "d4": 130}
NAMES = DATABASE + QUERIES


def red_level(name):
    return 20 * (NAMES.index(name) + 1)


def write_buildings(root, dataset="roxford5k"):
    """The fixture in the benchmark's layout: <root>/<dataset>/{jpg/<name>.jpg, gnd_<dataset>.pkl}."""
    folder = os.path.join(root, dataset, "jpg")
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(DATABASE):
        size = (40, 32) if i % 2 else (32, 40)  # two shapes, so extraction batches them apart
        Image.new("RGB", size, (red_level(name), 60 * (i // 2), 128)).save(os.path.join(folder, f"{name}.jpg"))
    for i, name in enumerate(QUERIES):
        image = Image.new("RGB", (80, 64), (FRAME_RED, 0, 0))
        image.paste((red_level(name), 60 * i, 128), tuple(BOX))
        image.save(os.path.join(folder, f"{name}.jpg"), quality=95, subsampling=0)  # no colour bleeding
    with open(os.path.join(root, dataset, f"gnd_{dataset}.pkl"), "wb") as f:
        pickle.dump({"imlist": DATABASE, "qimlist": QUERIES, "gnd": GND}, f)
    return root


@pytest.fixture(scope="module")
def buildings(tmp_path_factory):
    return write_buildings(str(tmp_path_factory.mktemp("revisitop")))


class ImageFeatures(nn.Module):
    """Features [B, 2]: the unit vector at ``angles[name]`` of the image whose red level it sees."""

    def __init__(self, angles):
        super().__init__()
        self.angles = angles

    def input_size(self, height, width):
        return height, width

    def forward(self, images):  # normalised [B, 3, H, W]
        red = (images[:, 0].mean(dim=(1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
        feats = []
        for level in red.tolist():
            index = round(level / 20) - 1
            assert 0 <= index < len(NAMES) and abs(level - red_level(NAMES[index])) < 3, f"no image has red {level}"
            angle = math.radians(self.angles[NAMES[index]])
            feats.append([math.cos(angle), math.sin(angle)])
        return torch.tensor(feats)


def evaluate(root, features, max_side=32, multiscale=False):
    """{setting: mAP} of ``features`` on the fixture, through the script's data and feature path."""
    ground_truth = read_ground_truth(root, "roxford5k")
    model = MultiScale(features) if multiscale else features
    sets = (
        RetrievalImages.queries(root, "roxford5k", ground_truth, max_side, features.input_size),
        RetrievalImages.database(root, "roxford5k", ground_truth, max_side, features.input_size),
    )
    query_feats, database_feats = (
        retrieval_features(model, images, 2, 0, torch.device("cpu"), contextlib.nullcontext) for images in sets
    )
    ranking = rank_database(query_feats, database_feats)
    return {s: revisited_map(ranking, protocol_ground_truth(ground_truth["gnd"], s))[0] for s in ("medium", "hard")}


# -----------------------------------------------------------------------------
# The benchmark's average precision, on rankings computed by hand
# -----------------------------------------------------------------------------


def test_average_precision_by_hand():
    assert average_precision([0, 1], 2) == 1.0
    assert average_precision([1], 1) == pytest.approx((0 / 1 + 1 / 2) / 2)  # 1/4
    # second positive at rank 2: the step from 1/2 (before) to 2/3 (at it)
    assert average_precision([0, 2], 2) == pytest.approx((1 + (1 / 2 + 2 / 3) / 2) / 2)  # 19/24
    assert average_precision([0], 2) == pytest.approx(0.5)  # a positive never ranked adds nothing


def test_ignored_images_are_taken_out_of_the_ranking():
    ranking = [[3, 0, 1, 2], [0, 1, 2, 3]]
    gt = [(np.array([0, 2]), np.array([3])), (np.array([], dtype=np.int64), np.array([1]))]
    mean_ap, aps = revisited_map(ranking, gt)
    # query 0: without junk 3, positives 0 and 2 are at 0 and 2 (with it, at 1 and 3: 1/3)
    assert aps[0] == pytest.approx(19 / 24) and math.isnan(aps[1])
    assert mean_ap == pytest.approx(19 / 24)  # a query without positives is left out of the mean


def test_medium_and_hard_settings_of_the_ground_truth():
    medium, hard = (protocol_ground_truth(GND, s) for s in ("medium", "hard"))
    assert [(p.tolist(), j.tolist()) for p, j in medium] == [([0, 1], []), ([2, 3], []), ([4], [5])]
    assert [(p.tolist(), j.tolist()) for p, j in hard] == [([1], [0]), ([3], [2]), ([], [4, 5])]


# -----------------------------------------------------------------------------
# The fixture through the data set, the batching by size and the feature gathering
# -----------------------------------------------------------------------------


def test_a_perfect_encoder_reaches_100(buildings):
    assert evaluate(buildings, ImageFeatures(PERFECT)) == {"medium": 1.0, "hard": 1.0}


@pytest.mark.parametrize("multiscale", [False, True])
def test_a_permuted_encoder_gets_the_hand_computed_map(buildings, multiscale):
    result = evaluate(buildings, ImageFeatures(PERMUTED), multiscale=multiscale)
    assert result["medium"] == pytest.approx(5 / 12) and result["hard"] == pytest.approx(1 / 6)


def test_queries_are_cropped_to_their_box_and_shrunk(buildings):
    ground_truth = read_ground_truth(buildings, "roxford5k")
    queries = RetrievalImages.queries(buildings, "roxford5k", ground_truth, 16, lambda h, w: (h, w))
    image, index = queries[1]
    assert index == 1 and image.shape == (3, 16, 16)  # the 32 x 32 box, shrunk to 16
    whole = RetrievalImages.queries(buildings, "roxford5k", ground_truth, 16, lambda h, w: (h, w), crop=False)
    assert whole[1][0].shape == (3, 13, 16)  # 80 x 64, shrunk: the frame is in
    red = (image[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
    assert (red - red_level("q1")).abs().max() < 3  # nothing of the frame
    database = RetrievalImages.database(buildings, "roxford5k", ground_truth, 64, lambda h, w: (h, w))
    assert database[0][0].shape == (3, 40, 32) and database.input_size(1) == (32, 40)  # never enlarged


def test_missing_files_name_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        read_ground_truth(str(tmp_path), "rparis6k")
    message = str(error.value)
    assert f"{tmp_path}/rparis6k/gnd_rparis6k.pkl" in message and f"{tmp_path}/rparis6k/jpg" in message
    root = write_buildings(str(tmp_path / "partial"))
    os.remove(os.path.join(root, "roxford5k", "jpg", "d3.jpg"))
    with pytest.raises(FileNotFoundError, match=r"missing: 1 of its 9 images \(.*/jpg/d3.jpg"):
        read_ground_truth(root, "roxford5k")


class RunsCode:
    def __reduce__(self):
        return os.system, ("true",)


def test_a_ground_truth_that_would_run_code_is_refused(tmp_path):
    os.makedirs(tmp_path / "roxford5k" / "jpg")
    with open(tmp_path / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": [RunsCode()]}, f)
    with pytest.raises(ValueError, match=r"refused to read .* it pickles (posix|os)\.system"):
        read_ground_truth(str(tmp_path), "roxford5k")


# -----------------------------------------------------------------------------
# eval_retrieval.py end to end: a ViT-Tiny checkpoint at 32 px, images up to 48 px
# -----------------------------------------------------------------------------


def retrieval_args(root, out, *opts, flags=()):
    return ["eval_retrieval.py", "--cfg", os.path.join(ROOT, "configs/moby_vit_tiny.yaml"), "--output", str(out),
            "--tag", "t", *flags, "--opts", "DATA.DATASET", "roxford5k", "DATA.TRANSFER_ROOT", root,
            "DATA.IMG_SIZE", "32", "RETRIEVAL.IMG_SIZE", "48", "DATA.BATCH_SIZE", "2", "DATA.NUM_WORKERS", "0",
            *opts]  # fmt: skip


def map_lines(out):
    (log,) = glob.glob(os.path.join(out, "*", "t", "retrieval_roxford5k", "log_rank0.txt"))
    text = open(log).read()
    return text, re.findall(r"roxford5k (?:medium|hard): mAP [\d.]+ over \d queries|mAP \(revisited.*", text)


@pytest.mark.slow
def test_eval_retrieval_end_to_end(buildings, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "pretrained.pth"
    torch.save({"model": {f"encoder.{k}": v for k, v in vit_tiny(img_size=32).state_dict().items()}, "epoch": 3}, ckpt)
    features = str(tmp_path / "features.pth")
    pretrained = ["LINEAR_EVAL.PRETRAINED", str(ckpt), "RETRIEVAL.MULTISCALE", "True"]

    one = run_script(retrieval_args(buildings, tmp_path / "one", *pretrained, flags=["--dump-features", features]))
    assert one.returncode == 0, one.stderr[-3000:]
    text, lines = map_lines(tmp_path / "one")
    assert f"loaded the encoder of {ckpt} (pretraining epoch 3)" in text
    assert "6 database images, 3 queries (cropped to their boxes); longest side at most 48 px, scales 1" in text
    assert len(lines) == 3 and "over 3 queries" in lines[0] and "over 2 queries" in lines[1]
    assert os.path.isfile(os.path.join(tmp_path, "one", "moby__vit_tiny__odpr02_tdpr0_cm099_ct02_queue4096_proj2_pred2",
                                       "t", "retrieval_roxford5k", "config.json"))  # fmt: skip

    # the dumped features give the logged figures
    saved = torch.load(features, weights_only=True)
    assert saved["queries"].shape == (3, 192) and saved["database"].shape == (6, 192)
    assert torch.allclose(saved["database"].norm(dim=1), torch.ones(6))
    medium = revisited_map(rank_database(saved["queries"], saved["database"]), protocol_ground_truth(GND, "medium"))
    assert f"medium: mAP {100 * medium[0]:.2f} over 3 queries" in lines[0]

    # two processes, each a shard of both sets: the same features, so the same figures
    two = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                      *retrieval_args(buildings, tmp_path / "two", *pretrained)])  # fmt: skip
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert map_lines(tmp_path / "two")[1] == lines

    # the saved features alone, no checkpoint anywhere (in this process): the same figures again
    argv = retrieval_args(buildings, tmp_path / "again", flags=["--load-features", features])[1:]
    results = eval_retrieval.main(*eval_retrieval.setup(argv))
    assert map_lines(tmp_path / "again")[1] == lines and results["medium"] == pytest.approx(100 * medium[0])


def test_the_encoder_settings_come_from_the_checkpoint(buildings, tmp_path):
    ckpt = tmp_path / "pretrained.pth"
    state = {f"encoder.{k}": v for k, v in vit_tiny(img_size=32).state_dict().items()}
    torch.save({"model": state, "epoch": 3, "config": "DATA:\n  IMG_SIZE: 32\nMODEL:\n  ENCODER: vit_tiny\n"}, ckpt)
    argv = retrieval_args(buildings, tmp_path / "out", "LINEAR_EVAL.PRETRAINED", str(ckpt))[1:]
    size = argv.index("DATA.IMG_SIZE")
    config, env, logger, *_ = eval_retrieval.setup(argv[:size] + argv[size + 2 :])  # no DATA.IMG_SIZE given
    assert config.DATA.IMG_SIZE == 32


def test_missing_data_is_one_error_naming_the_layout(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(eval_retrieval.setup, eval_retrieval.main, retrieval_args(str(tmp_path / "none"), tmp_path / "out")[1:])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: roxford5k is not under") and "Traceback" not in err
    assert f"{tmp_path}/none/roxford5k/gnd_roxford5k.pkl  - the revisited ground truth" in err
    assert f"{tmp_path}/none/roxford5k/jpg  - folder of every image it names" in err
    assert not (tmp_path / "out").exists()  # checked before any folder is made
