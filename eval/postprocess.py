"""The reference post-processing of predicted windows before scoring (R²-Tuning ``Grounding.evaluate``).

:func:`postprocess_for` is the one entry: validation, ``r2 predict`` and ``r2 eval --postprocess``
apply it to raw model outputs (plain ``r2 eval`` scores prediction files as they are). Steps, all
in seconds and in the dtype of the input (float32 model outputs stay float32, like the
reference's tensors), with the settings of the dataset registry (:mod:`shards.datasets`):

1. clamp start and end to ``[0, duration]``;
2. round to multiples of the dataset's clip unit, only rows whose *unclamped* end was
   ``< duration`` (QVHighlights 2 s, Charades-STA 0.1 s; none for TACoS / Ego4D-NLQ);
3. NMS, greedy in score order, rows are never dropped: ``normal`` zeroes the scores of later
   rows with IoU ≥ the threshold, ``linear`` scales them by ``1 - IoU``, ``gaussian`` by
   ``exp(-IoU² / sigma)``; then the rows are sorted by score, descending (highlight-only
   datasets: no NMS).
"""

from __future__ import annotations

import numpy as np

from shards.datasets import DatasetSpec, get_dataset
from shards.errors import ConfigError

NMS_MODES = ("normal", "linear", "gaussian")
DEFAULT_NMS_THRES = 0.7
"""IoU threshold of ``normal`` NMS when the dataset registry gives none (the reference's default)."""


def _as_windows(windows: np.ndarray) -> np.ndarray:
    """A float copy of ``windows`` shaped ``(N, 3)``; float inputs keep their dtype."""
    array = np.asarray(windows)
    dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.float64
    return np.array(array, dtype=dtype).reshape(-1, 3)


def clamp_and_round(windows: np.ndarray, duration: float, unit: float | None = None) -> np.ndarray:
    """Clamp windows to the video and round them to the clip unit.

    Args:
        windows: ``(N, 3)`` ``[start_s, end_s, score]``.
        duration: video length in seconds.
        unit: rounding unit in seconds (half-to-even, like ``torch.round``); ``None`` or 0 = no rounding.

    Returns:
        A new ``(N, 3)`` array, rows in the input order. Rows whose end was at or past
        ``duration`` are clamped but not rounded, so they keep ending exactly at ``duration``.
    """
    out = _as_windows(windows)
    inside = out[:, 1] < duration
    np.clip(out[:, :2], 0, duration, out=out[:, :2])
    if unit:
        out[inside, :2] = np.round(out[inside, :2] / unit) * unit
    return out


def _iou_with(window: np.ndarray, others: np.ndarray) -> np.ndarray:
    """True IoU of one ``(2,)`` window with ``(M, 2)`` windows; 0 where the union is empty."""
    inter = np.clip(np.minimum(window[1], others[:, 1]) - np.maximum(window[0], others[:, 0]), 0, None)
    union = (window[1] - window[0]) + (others[:, 1] - others[:, 0]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(
    windows: np.ndarray, mode: str = "normal", thres: float = DEFAULT_NMS_THRES, sigma: float = 0.5
) -> np.ndarray:
    """Greedy temporal NMS that rescores instead of dropping.

    Step ``i`` moves the highest-scored remaining row (first on ties) to position ``i`` and
    suppresses every later row by its IoU with it: ``normal`` sets scores with IoU ≥ ``thres``
    to 0, ``linear`` multiplies them by ``1 - IoU``, ``gaussian`` by ``exp(-IoU² / sigma)``.

    Args:
        windows: ``(N, 3)`` ``[start_s, end_s, score]``.
        mode: ``normal`` | ``linear`` | ``gaussian``.
        thres: IoU threshold of ``normal``.
        sigma: width of ``gaussian``.

    Returns:
        A new ``(N, 3)`` array with the rescored rows sorted by score, descending (stable).

    Raises:
        ConfigError: unknown ``mode``.
    """
    if mode not in NMS_MODES:
        raise ConfigError(f"unknown NMS mode {mode!r}; choose one of: {', '.join(NMS_MODES)}")
    out = _as_windows(windows)
    for i in range(len(out)):
        best = i + int(np.argmax(out[i:, 2]))
        out[[i, best]] = out[[best, i]]
        iou = _iou_with(out[i, :2], out[i + 1 :, :2])
        later = out[i + 1 :, 2]
        if mode == "normal":
            later[iou >= thres] = 0
        elif mode == "linear":
            later *= 1 - iou
        else:
            later *= np.exp(-(iou**2) / sigma)
    return out[np.argsort(-out[:, 2], kind="stable")]


def postprocess_for(dataset: str | DatasetSpec, windows: np.ndarray, duration: float) -> np.ndarray:
    """The dataset's reference post-processing of raw windows: :func:`clamp_and_round` then :func:`nms`.

    The one post-processing entry, used by validation, ``r2 predict`` and ``r2 eval --postprocess``.
    Clip unit, NMS mode and threshold come from the :mod:`shards.datasets` registry: QVHighlights
    unit 2 s, ``normal`` NMS at 0.7; Charades-STA 0.1 s, ``linear``; TACoS / Ego4D-NLQ no rounding,
    ``linear``; highlight-only datasets no NMS. A mode without a registry threshold uses
    :data:`DEFAULT_NMS_THRES` (a threshold of 0 stays 0).

    Args:
        dataset: registry name (aliases work) or a :class:`~shards.datasets.DatasetSpec`.
        windows: ``(N, 3)`` raw ``[start_s, end_s, score]`` model output.
        duration: video length in seconds (from the annotation).

    Returns:
        ``(N, 3)``: every input row, sorted by (rescored) score when NMS ran.

    Raises:
        UnknownDatasetError: unknown dataset name.
    """
    spec = dataset if isinstance(dataset, DatasetSpec) else get_dataset(dataset)
    out = clamp_and_round(windows, duration, spec.clip_unit)
    if spec.nms_mode is None:
        return out
    thres = DEFAULT_NMS_THRES if spec.nms_thres is None else spec.nms_thres
    return nms(out, spec.nms_mode, thres)
