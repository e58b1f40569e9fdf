"""The DAVIS benchmark's measures of a predicted object mask against its annotation.

J, region similarity: the intersection over union of the two masks (1 when both are empty).

F, boundary accuracy: the F-measure 2PR / (P + R) of the masks' boundaries. A mask's boundary
is the set of its pixels that differ from their right, lower or lower-right neighbour (those
inside the image): one pixel wide, half a pixel towards the origin from the true contour, and
never along the image's border. A boundary pixel is matched when a pixel of the other boundary
lies within ``r = ceil(0.008 x image diagonal)`` pixels (Euclidean; the benchmark dilates by a
disk of radius r: 8 pixels on 480 x 854 frames). P is the matched share of the prediction's
boundary, R of the annotation's; an empty boundary has P = 1 (prediction) or R = 1 (annotation),
so both empty gives F = 1 and one empty gives F = 0.

The semi-supervised benchmark scores every frame but the first (given) and the last, takes
for each object the mean over those frames, and reports J-Mean and F-Mean, the means over all
objects of all videos, and J&F-Mean = (J-Mean + F-Mean) / 2. Unlabelled pixels (255) count as
background, as the benchmark's semi-supervised evaluation counts them.
"""

import math

import numpy as np
from scipy.ndimage import distance_transform_edt

BOUNDARY_TOLERANCE = 0.008  # of the image diagonal


def region_similarity(pred: np.ndarray, gt: np.ndarray) -> float:
    """J of two [H, W] boolean masks."""
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels of ``mask`` that differ from their right, lower or lower-right neighbour."""
    boundary = np.zeros(mask.shape, dtype=bool)
    boundary[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    boundary[:-1, :] |= mask[:-1, :] != mask[1:, :]
    boundary[:-1, :-1] |= mask[:-1, :-1] != mask[1:, 1:]
    return boundary


def boundary_tolerance(shape: tuple[int, int], tolerance: float = BOUNDARY_TOLERANCE) -> int:
    """Matching distance in pixels: ``tolerance`` of the diagonal, rounded up (or ``tolerance`` itself if >= 1)."""
    return int(tolerance) if tolerance >= 1 else math.ceil(tolerance * math.hypot(*shape))


def _matched(points: np.ndarray, targets: np.ndarray, radius: int) -> int:
    """How many True pixels of ``points`` lie within ``radius`` of a True pixel of ``targets`` (non-empty)."""
    return int(np.count_nonzero(points & (distance_transform_edt(~targets) <= radius)))


def boundary_f_measure(pred: np.ndarray, gt: np.ndarray, tolerance: float = BOUNDARY_TOLERANCE) -> float:
    """F of two [H, W] boolean masks."""
    pred_b, gt_b = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = np.count_nonzero(pred_b), np.count_nonzero(gt_b)
    if n_pred == 0 or n_gt == 0:
        return 1.0 if n_pred == n_gt else 0.0
    # distances between the two boundaries only: crop to the box holding both (faster, same result)
    rows, cols = np.nonzero(pred_b | gt_b)
    box = np.s_[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    pred_b, gt_b = pred_b[box], gt_b[box]
    radius = boundary_tolerance(pred.shape, tolerance)
    precision = _matched(pred_b, gt_b, radius) / n_pred
    recall = _matched(gt_b, pred_b, radius) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def score_frame(pred: np.ndarray, gt: np.ndarray, object_ids) -> list[tuple[float, float]]:
    """(J, F) of each object of ``object_ids`` in [H, W] index masks ``pred`` and ``gt``."""
    return [(region_similarity(pred == i, gt == i), boundary_f_measure(pred == i, gt == i)) for i in object_ids]


def summarize(objects: list[tuple[float, float]]) -> dict[str, float]:
    """J-Mean, F-Mean and J&F-Mean (in %) of per-object (mean J, mean F) pairs."""
    j_mean = 100 * float(np.mean([j for j, _ in objects]))
    f_mean = 100 * float(np.mean([f for _, f in objects]))
    return {"J&F-Mean": (j_mean + f_mean) / 2, "J-Mean": j_mean, "F-Mean": f_mean}
