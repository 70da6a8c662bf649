"""Per-query training targets, built as the reference data pipeline builds them.

For one :class:`~shards.schema.Query` and its video of ``T`` stored clips at ``fps`` clips per second:

- ``boundary`` (M, 2) seconds (moment-retrieval sets): windows clamped to ``[0, T / fps]`` (the
  stored length wins over ``duration``), rows with ``end < start`` swapped, rows shorter than one
  clip replaced by a one-clip window centred at the old centre (centre clamped to
  ``[0.5 / fps, T / fps - 0.5 / fps]``).
- ``saliency`` (T',) in [0, 1] per clip:
  QVHighlights ``sum(3 worker scores) / 12`` on ``clip_ids``; other grounding sets binary, 1 on
  clips ``ceil(s * fps) .. ceil(e * fps) - 1`` of every window; TVSum ``(sum of 20 annotators - 20) / 80``;
  YouTube Highlights ``(match + 1) / 2``.
- ``positives``: clips the saliency loss may use as its positive (``pos_clip``): saliency > 0 for
  grounding sets, > the (lower) median for TVSum, > 0.5 for YouTube Highlights.

``T' = T`` except for the highlight sets, whose video is cut to the annotated clips
(``min(T, #annotated clips)``), as in the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from shards.datasets import DatasetSpec
from shards.errors import AnnotationError
from shards.schema import Query

QVH_MAX_SALIENCY = 12.0
"""Sum of the three 0..4 worker scores of a QVHighlights clip at most."""


@dataclass
class QueryTargets:
    """Targets of one query; times in seconds, indices in clips.

    Attributes:
        boundary: (M, 2) float32 ``[start, end]`` seconds; (0, 2) for highlight-only sets.
        saliency: (num_clips,) float32 per-clip saliency in [0, 1].
        num_clips: clips of the video the query uses (``<= T``).
        positives: (K,) int64 clip indices eligible as ``pos_clip`` (may be empty: not trainable).
    """

    boundary: np.ndarray
    saliency: np.ndarray
    num_clips: int
    positives: np.ndarray


def clamp_boundary(moments: list[list[float]], num_clips: int, fps: float) -> np.ndarray:
    """Reference boundary clean-up of ``moments`` (seconds) for a video of ``num_clips`` clips.

    Returns:
        (M, 2) float32 windows in seconds, each inside ``[0, num_clips / fps]`` and at least one clip long.
    """
    boundary = np.asarray(moments, dtype=np.float32).reshape(-1, 2)
    max_time = np.float32(num_clips / fps)
    clip = np.float32(1.0 / fps)
    half = np.float32(0.5 / fps)
    boundary = np.clip(boundary, np.float32(0.0), max_time)
    swapped = boundary[:, 1] < boundary[:, 0]
    boundary[swapped] = boundary[swapped][:, ::-1]
    short = boundary[:, 1] - boundary[:, 0] < clip
    if short.any():
        centre = np.clip(boundary[short].sum(axis=1) / np.float32(2.0), half, max_time - half)
        boundary[short] = np.stack([centre - half, centre + half], axis=1)
    return boundary


def binary_saliency(boundary: np.ndarray, num_clips: int, fps: float) -> np.ndarray:
    """(num_clips,) float32: 1 on clips ``ceil(s * fps) .. ceil(e * fps) - 1`` of every window (seconds)."""
    saliency = np.zeros(num_clips, dtype=np.float32)
    scaled = boundary.astype(np.float32) * np.float32(fps)
    for start, end in scaled.tolist():
        lo, hi = math.ceil(start), min(math.ceil(end), num_clips)
        saliency[max(lo, 0) : max(hi, 0)] = 1.0
    return saliency


def qvh_saliency(query: Query, num_clips: int, fps: float) -> np.ndarray:
    """(num_clips,) float32 QVHighlights saliency ``sum(scores) / 12`` on ``clip_ids``, zero elsewhere.

    The label vector has ``int(duration * fps)`` clips and is cut or zero-padded to the stored length.
    """
    sal = query.saliency or {}
    ids = [int(i) for i in sal.get("clip_ids", [])]
    scores = sal.get("scores", [])
    if len(ids) != len(scores):
        raise AnnotationError(
            f"query {query.qid!r}: {len(ids)} saliency clip_ids but {len(scores)} score rows; "
            "fix the annotation file and rebuild the store"
        )
    length = max([int(query.duration * fps), num_clips] + [i + 1 for i in ids])
    full = np.zeros(length, dtype=np.float32)
    for idx, row in zip(ids, scores, strict=True):
        full[idx] = np.float32(sum(row)) / np.float32(QVH_MAX_SALIENCY)
    return full[:num_clips]


def _highlight_labels(query: Query, key: str) -> np.ndarray:
    values = (query.saliency or {}).get(key)
    if not values:
        raise AnnotationError(
            f"query {query.qid!r} of video {query.vid!r} has no saliency '{key}' labels; "
            "highlight-detection training needs them"
        )
    return np.asarray(values, dtype=np.float32)


def _lower_median(values: np.ndarray) -> float:
    """Median as ``torch.median`` defines it: the lower of the two middle values."""
    return float(np.sort(values)[(len(values) - 1) // 2])


def query_targets(query: Query, num_clips: int, fps: float, spec: DatasetSpec) -> QueryTargets:
    """Targets of ``query`` for a stored video of ``num_clips`` clips sampled at ``fps``.

    Raises:
        AnnotationError: highlight labels missing or inconsistent.
    """
    if spec.name == "tvsum":
        anno = _highlight_labels(query, "scores")
        per_clip = (anno.reshape(len(anno), -1).sum(axis=1) - np.float32(20.0)) / np.float32(80.0)
        used = min(num_clips, len(per_clip))
        saliency = per_clip[:used].astype(np.float32)
        positives = np.flatnonzero(saliency > _lower_median(saliency))
        return QueryTargets(np.zeros((0, 2), np.float32), saliency, used, positives.astype(np.int64))
    if spec.name == "youtube":
        match = _highlight_labels(query, "match")
        used = min(num_clips, len(match))
        saliency = ((match[:used] + np.float32(1.0)) / np.float32(2.0)).astype(np.float32)
        positives = np.flatnonzero(saliency > 0.5)
        return QueryTargets(np.zeros((0, 2), np.float32), saliency, used, positives.astype(np.int64))

    boundary = clamp_boundary(query.moments, num_clips, fps)
    if query.saliency and "clip_ids" in query.saliency:
        saliency = qvh_saliency(query, num_clips, fps)
    else:
        saliency = binary_saliency(boundary, num_clips, fps)
    positives = np.flatnonzero(saliency > 0).astype(np.int64)
    return QueryTargets(boundary, saliency, num_clips, positives)


def sample_positive(positives: np.ndarray, generator: torch.Generator) -> int:
    """Draw one clip index uniformly from ``positives`` (non-empty) with ``generator``."""
    pick = int(torch.randint(len(positives), (1,), generator=generator))
    return int(positives[pick])
