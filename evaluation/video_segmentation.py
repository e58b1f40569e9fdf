"""Semi-supervised video object segmentation by label propagation on frozen features (DINO's protocol).

    propagation = LabelPropagation(features_0, labels_0, PropagationSettings())
    for features_t in later frames:            # [D, h, w] feature maps, in order
        labels_t = propagation(features_t)      # [C, h, w]: a distribution over C labels per cell

Given the first frame's mask, each later frame takes the labels of its feature cells from its
context: the first frame and the ``n_last_frames`` frames before it (their propagated,
soft labels). A cell of the frame compares its L2-normalised feature with those of the context
cells at most ``neighborhood`` rows and columns away (in every context frame), keeps the
``topk`` most similar of all of them, and averages their labels weighted by a softmax of the
cosine similarities at ``temperature``. The label map is then upsampled bilinearly to the
resized frame, each label's map rescaled to [0, 1], and the argmax resized (nearest) to the
original frame.

Frames are resized as DINO resizes them: the short side to ``short_side`` (480), the long side
proportionally and down to a multiple of 64 (854 x 480 -> 832 x 480), then to the nearest size the
encoder takes (``PatchFeatures.input_size``: 480 x 864 for a Swin at 224 px).
"""

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data.photometric import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class PropagationSettings:
    n_last_frames: int = 7
    neighborhood: int = 12  # 0: no spatial restriction
    topk: int = 5
    temperature: float = 0.1
    short_side: int = 480


def resized_frame_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(H, W) of a frame resized to ``short_side``, its long side floored to a multiple of 64 (DINO)."""
    if height > width:
        return int(height * short_side / width // 64 * 64), short_side
    return short_side, int(width * short_side / height // 64 * 64)


def prepare_frame(frame: np.ndarray, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """[H, W, 3] uint8 RGB -> [1, 3, size] normalised with ImageNet's mean and std, resized bilinearly."""
    image = torch.from_numpy(frame).to(device).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (image - mean) / std


def first_frame_labels(mask: np.ndarray, object_ids: list[int], grid: tuple[int, int], device) -> torch.Tensor:
    """One-hot [1 + len(object_ids), h, w] labels on the feature grid: label 0 the background
    (and pixels of no listed object), label k the object ``object_ids[k - 1]``; the mask is
    resized to the grid by nearest neighbour (pixel centres, as PIL's NEAREST)."""
    lookup = torch.zeros(256, dtype=torch.long)
    lookup[torch.tensor(object_ids, dtype=torch.long)] = torch.arange(1, len(object_ids) + 1)
    labels = lookup[torch.from_numpy(mask.astype(np.int64))][None, None].float()  # [1, 1, H, W]
    labels = F.interpolate(labels, size=grid, mode="nearest-exact")[0, 0].long()
    return F.one_hot(labels, len(object_ids) + 1).permute(2, 0, 1).float().to(device)


def neighborhood_mask(height: int, width: int, radius: int, device=None) -> torch.Tensor:
    """[h * w, h * w] bool: source cell s may give labels to query cell q when they are at most
    ``radius`` rows and ``radius`` columns apart (cells in row-major order)."""
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= radius  # [h, h]
    near_cols = (cols[:, None] - cols[None, :]).abs() <= radius  # [w, w]
    return (near_rows[:, None, :, None] & near_cols[None, :, None, :]).reshape(height * width, height * width)


def propagate(query, sources, source_labels, topk, temperature, allowed=None):
    """Labels of the query cells from the source cells.

    query: [D, N] unit features of the frame; sources: [T, D, N] unit features of T context
    frames; source_labels: [T, C, N] their label distributions; allowed: [N, N] bool (source
    cell, query cell) or None. Each query cell takes the ``topk`` most similar allowed source
    cells of all T frames and averages their labels with weights softmax(cosine / temperature).
    Returns [C, N].
    """
    num_frames, num_labels, n = source_labels.shape
    similarity = torch.einsum("tds,dq->tsq", sources, query)  # [T, N source, N query]
    if allowed is not None:
        similarity = similarity.masked_fill(~allowed, float("-inf"))
    top, index = similarity.reshape(num_frames * n, -1).topk(min(topk, num_frames * n), dim=0)  # [k, N query]
    weight = torch.softmax(top / temperature, dim=0)  # [k, N query]
    labels = source_labels.permute(1, 0, 2).reshape(num_labels, num_frames * n)  # [C, T * N]
    return (labels[:, index] * weight).sum(dim=1)  # [C, k, N query] -> [C, N query]


class LabelPropagation:
    """The labels of each new frame of a video from the first frame and the ``n_last_frames``
    frames before it (DINO's queue). Feature maps [D, h, w], labels [C, h, w]."""

    def __init__(self, first_features, first_labels, settings: PropagationSettings):
        self.settings = settings
        _, self.height, self.width = first_features.shape
        self.first = (self._unit(first_features), first_labels.flatten(1))
        self.recent = deque(maxlen=settings.n_last_frames)  # (features, labels) of the frames before
        self.allowed = None
        if settings.neighborhood > 0:
            self.allowed = neighborhood_mask(self.height, self.width, settings.neighborhood, first_features.device)

    @staticmethod
    def _unit(features):
        return F.normalize(features.float().flatten(1), dim=0)  # [D, h * w]

    def __call__(self, features):
        """[D, h, w] features of the next frame -> its [C, h, w] labels."""
        query = self._unit(features)
        context = [self.first, *self.recent]
        sources = torch.stack([f for f, _ in context])
        source_labels = torch.stack([labels for _, labels in context])
        s = self.settings
        labels = propagate(query, sources, source_labels, s.topk, s.temperature, self.allowed)
        self.recent.append((query, labels))  # dropping the oldest (none kept when n_last_frames is 0)
        return labels.view(-1, self.height, self.width)


def labels_to_mask(labels: torch.Tensor, frame_size: tuple[int, int], output_size: tuple[int, int]) -> torch.Tensor:
    """[C, h, w] label distributions -> [output_size] label indices: upsampled bilinearly to
    ``frame_size`` (the resized frame), each label's map rescaled to [0, 1] (when it varies and
    is positive somewhere, as DINO does), argmax, then resized to ``output_size`` (nearest)."""
    scores = F.interpolate(labels[None], size=frame_size, mode="bilinear", align_corners=False)[0]
    low = scores.amin(dim=(1, 2), keepdim=True)
    high = scores.amax(dim=(1, 2), keepdim=True)
    rescale = (high > 0) & (high > low)
    scores = torch.where(rescale, (scores - low) / torch.where(rescale, high - low, 1), scores)
    best = scores.argmax(dim=0)[None, None].float()
    return F.interpolate(best, size=output_size, mode="nearest-exact")[0, 0].long()


@torch.no_grad()
def segment_video(video, features, settings: PropagationSettings, device, autocast):
    """Yield (frame index, [H, W] uint8 mask of palette indices) for every frame of ``video``
    (a ``data.davis.Video``), the first being its annotation; ``features``: a ``PatchFeatures``."""
    first_mask, _ = video.read_mask(0)
    object_ids = video.object_ids()
    yield 0, first_mask
    size = features.input_size(*resized_frame_size(*first_mask.shape, settings.short_side))
    palette_index = torch.tensor([0, *object_ids], dtype=torch.uint8, device=device)

    def feature_map(frame):
        with autocast():
            return features(prepare_frame(frame, size, device))[0].float()  # [D, h, w]

    first_features = feature_map(video.read_frame(0))
    first_labels = first_frame_labels(first_mask, object_ids, tuple(first_features.shape[1:]), device)
    propagation = LabelPropagation(first_features, first_labels, settings)
    for index in range(1, len(video.frames)):
        frame = video.read_frame(index)
        labels = propagation(feature_map(frame))
        yield index, palette_index[labels_to_mask(labels, size, frame.shape[:2])].cpu().numpy()
