"""J and F of the DAVIS benchmark against values worked out by hand on small masks."""

import numpy as np
import pytest

from evaluation.davis_metrics import (
    boundary_f_measure,
    boundary_map,
    boundary_tolerance,
    region_similarity,
    score_frame,
    summarize,
)


def square(shape, top, left, side):
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_boundary_of_a_square_is_the_ring_half_a_pixel_towards_the_origin():
    # a 4 x 4 square at rows/cols 5..8: the pixels differing from their right, lower or
    # lower-right neighbour are the ring of the 5 x 5 box at rows/cols 4..8 (16 pixels)
    expected = np.zeros((20, 20), dtype=bool)
    expected[4, 4:9] = expected[8, 4:9] = expected[4:9, 4] = expected[4:9, 8] = True
    assert np.array_equal(boundary_map(square((20, 20), 5, 5, 4)), expected)


def test_the_image_border_is_no_boundary():
    # the left half of the image: only the column where it ends is a boundary
    mask = np.zeros((6, 10), dtype=bool)
    mask[:, :5] = True
    expected = np.zeros((6, 10), dtype=bool)
    expected[:, 4] = True
    assert np.array_equal(boundary_map(mask), expected)
    assert not boundary_map(np.ones((6, 10), dtype=bool)).any()


def test_tolerance_is_0008_of_the_diagonal_rounded_up():
    assert boundary_tolerance((480, 854)) == 8  # 0.008 * 979.6 = 7.84
    assert boundary_tolerance((20, 20)) == 1  # 0.226
    assert boundary_tolerance((100, 100)) == 2  # 1.13
    assert boundary_tolerance((100, 100), tolerance=3) == 3


def test_j_of_shifted_squares():
    gt = square((20, 20), 5, 5, 4)
    assert region_similarity(gt, gt) == 1
    # shifted by one column: 4 x 3 shared of 4 x 5 covered
    assert region_similarity(square((20, 20), 5, 6, 4), gt) == pytest.approx(12 / 20)
    # by two: 4 x 2 of 4 x 6
    assert region_similarity(square((20, 20), 5, 7, 4), gt) == pytest.approx(8 / 24)
    assert region_similarity(square((20, 20), 12, 12, 4), gt) == 0
    empty = np.zeros((20, 20), dtype=bool)
    assert region_similarity(empty, empty) == 1 and region_similarity(empty, gt) == 0


def test_f_of_a_square_shifted_by_one_and_two_pixels():
    gt = square((20, 20), 5, 5, 4)  # tolerance 1 pixel on 20 x 20
    # one column: every boundary pixel has its counterpart one pixel away
    assert boundary_f_measure(square((20, 20), 5, 6, 4), gt) == 1
    # two columns: prediction ring rows 4..8 x cols 6..10, annotation ring cols 4..8.
    # Matched prediction pixels: top and bottom rows at cols 6..9 (4 + 4; col 10 is 2 away),
    # left column at rows 5 and 7 (next to the annotation's top and bottom rows; row 6 is 2 away);
    # the right column's 3 middle pixels are 2 from col 8. P = 10 / 16, and R = 10 / 16 by symmetry.
    assert boundary_f_measure(square((20, 20), 5, 7, 4), gt) == pytest.approx(10 / 16)


def test_f_tolerance_grows_with_the_image():
    # the same two-column shift on 100 x 100 (tolerance 2): every pixel is matched
    gt = square((100, 100), 5, 5, 4)
    assert boundary_f_measure(square((100, 100), 5, 7, 4), gt) == 1
    # three columns: the far column of each ring (5 pixels) is 3 or more from the other ring,
    # its other 11 pixels within 2 (its near column lies 1 from the other's far column)
    assert boundary_f_measure(square((100, 100), 5, 8, 4), gt) == pytest.approx(11 / 16)


def test_f_of_empty_masks():
    gt = square((20, 20), 5, 5, 4)
    empty = np.zeros((20, 20), dtype=bool)
    assert boundary_f_measure(empty, empty) == 1
    assert boundary_f_measure(empty, gt) == 0 and boundary_f_measure(gt, empty) == 0


def test_frame_scores_and_summary_per_object():
    gt = np.zeros((20, 20), dtype=np.uint8)
    gt[5:9, 5:9] = 1
    gt[12:16, 12:16] = 2
    pred = gt.copy()
    pred[pred == 2] = 0
    pred[12:16, 14:18] = 2  # object 2 shifted by two columns; 255 pixels count as background
    gt[0, 0] = 255
    (j1, f1), (j2, f2) = score_frame(pred, gt, [1, 2])
    assert (j1, f1) == (1, 1)
    assert j2 == pytest.approx(8 / 24) and f2 == pytest.approx(10 / 16)
    summary = summarize([(j1, f1), (j2, f2)])
    assert summary["J-Mean"] == pytest.approx(100 * (1 + 1 / 3) / 2)
    assert summary["F-Mean"] == pytest.approx(100 * (1 + 10 / 16) / 2)
    assert summary["J&F-Mean"] == pytest.approx((summary["J-Mean"] + summary["F-Mean"]) / 2)
