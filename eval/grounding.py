"""Moment-retrieval metrics (QVHighlights, Charades-STA, TACoS, Ego4D-NLQ), vectorised over queries.

Definitions follow R²-Tuning's evaluation (itself a superset of moment_detr ``standalone_eval``;
see ``docs/eval.md``): R1 / R5 at IoU 0.30 … 0.95, mIoU of the top-1 window, and the
ActivityNet-style interpolated mAP over IoU 0.50 … 0.95 of the first 10 windows, for all queries
(``full``) and by ground-truth window length (``short`` ≤ 10 s, ``middle`` ≤ 30 s, ``long`` > 30 s).
All reported numbers are percentages rounded to 2 decimals. Times are seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eval.predictions import PredictionError, QueryPrediction, pair_with_ground_truth
from shards.schema import Query

MAP_THRESHOLDS: tuple[float, ...] = tuple(float(f"{t:.2f}") for t in np.linspace(0.5, 0.95, 10))
"""IoU thresholds of the mAP (keys ``"0.5"`` … ``"0.95"``)."""
RECALL_THRESHOLDS: tuple[float, ...] = tuple(float(f"{t:.2f}") for t in np.linspace(0.3, 0.95, 14))
"""IoU thresholds of R1 / R5 (keys ``"0.3"`` … ``"0.95"``)."""
LENGTH_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("short", 0.0, 10.0),
    ("middle", 10.0, 30.0),
    ("long", 30.0, math.inf),
    ("full", 0.0, math.inf),
)
"""``(name, low, high)``: a bucket keeps the ground-truth windows of length ``low < l <= high``
(``full`` keeps everything, unfiltered)."""
MAP_MAX_WINDOWS = 10
"""Only the first 10 predicted windows (file order) enter the mAP."""
RECALL_AT = 5
"""R5 looks at the first 5 predicted windows."""


def percent(value: float) -> float:
    """``value`` × 100 rounded to 2 decimals, the way the official scripts format it."""
    return float(f"{100 * value:.2f}")


def temporal_iou(windows: np.ndarray, others: np.ndarray) -> np.ndarray:
    """True IoU of every pair, broadcasting leading axes.

    Args:
        windows: ``(..., N, 2)`` ``[start, end]`` seconds.
        others: ``(..., M, 2)`` ``[start, end]`` seconds.

    Returns:
        ``(..., N, M)`` intersection / union; 0 where the union is empty (two zero-length windows).
    """
    s1, e1 = windows[..., :, None, 0], windows[..., :, None, 1]
    s2, e2 = others[..., None, :, 0], others[..., None, :, 1]
    inter = np.clip(np.minimum(e1, e2) - np.maximum(s1, s2), 0.0, None)
    union = (e1 - s1) + (e2 - s2) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def spanned_iou(windows: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection / span (``max(end) - min(start)``) of aligned pairs, as R1 / R5 / mIoU use it.

    Equals the true IoU whenever the two windows overlap (else both are 0).

    Args:
        windows: ``(N, 2)`` seconds.
        others: ``(N, 2)`` seconds.

    Returns:
        ``(N,)``; 0 where the span is 0.
    """
    inter = np.clip(
        np.minimum(windows[:, 1], others[:, 1]) - np.maximum(windows[:, 0], others[:, 0]), 0.0, None
    )
    span = np.maximum(windows[:, 1], others[:, 1]) - np.minimum(windows[:, 0], others[:, 0])
    return np.divide(inter, span, out=np.zeros_like(inter), where=span != 0)


def _pad(arrays: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack ``(n_i, width)`` arrays into ``(Q, max n_i, width)`` (zeros) plus a ``(Q, max n_i)`` mask."""
    longest = max(len(a) for a in arrays)
    out = np.zeros((len(arrays), longest, width), dtype=np.float64)
    mask = np.zeros((len(arrays), longest), dtype=bool)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a[:, :width]
        mask[i, : len(a)] = True
    return out, mask


def _rank_ground_truth(iou: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Ground-truth indices by decreasing IoU, ``(Q, P, G)``; padding (index >= count) last.

    Like the reference, each row of real ground truth is ranked by reversing numpy's default
    ``argsort``, so exact IoU ties are broken the same way the reference breaks them on the same
    numpy build (that sort is not stable on every CPU). Rows are grouped by their ground-truth
    count, so no padding enters a sort.
    """
    order = np.broadcast_to(np.arange(iou.shape[-1]), iou.shape).copy()
    for count in np.unique(counts):
        rows = np.nonzero(counts == count)[0]
        order[rows, :, :count] = np.argsort(iou[rows, :, :count], axis=-1)[..., ::-1]
    return order


def average_precision(windows: Sequence[np.ndarray], moments: Sequence[np.ndarray]) -> np.ndarray:
    """Interpolated AP of every query at each of :data:`MAP_THRESHOLDS`.

    Per query and threshold, the first :data:`MAP_MAX_WINDOWS` windows are sorted by score
    (stable, descending) and matched greedily: a window is a true positive if some not-yet-matched
    ground-truth window has IoU ≥ threshold, and it then takes the one with the highest IoU (ties
    broken as in the reference, see :func:`_rank_ground_truth`). AP is VOC-style: precision made
    monotone from the right and summed over the recall steps, recall measured against all
    ground-truth windows.

    Args:
        windows: per query ``(N_i, 3)`` ``[start, end, score]``, ``N_i >= 1``.
        moments: per query ``(M_i, 2)`` ground-truth windows, ``M_i >= 1``.

    Returns:
        ``(Q, len(MAP_THRESHOLDS))`` AP in [0, 1].
    """
    ranked = []
    for w in windows:
        top = w[:MAP_MAX_WINDOWS]
        ranked.append(top[np.argsort(-top[:, 2], kind="stable")])
    pred, pred_ok = _pad(ranked, 2)
    gt, gt_ok = _pad(moments, 2)
    thresholds = np.asarray(MAP_THRESHOLDS)
    n_query, n_pred, n_gt = len(ranked), pred.shape[1], gt.shape[1]

    iou = temporal_iou(pred, gt)  # (Q, P, G)
    iou[~np.broadcast_to(gt_ok[:, None, :], iou.shape)] = -np.inf
    order = _rank_ground_truth(iou, gt_ok.sum(axis=1))
    sorted_iou = np.take_along_axis(iou, order, axis=-1)

    locked = np.zeros((n_query, len(thresholds), n_gt), dtype=bool)
    tp = np.zeros((n_query, len(thresholds), n_pred))
    fp = np.zeros_like(tp)
    for p in range(n_pred):
        gt_order = np.broadcast_to(order[:, None, p, :], locked.shape)
        free = ~np.take_along_axis(locked, gt_order, axis=-1)
        candidate = (sorted_iou[:, None, p, :] >= thresholds[None, :, None]) & free
        hit = candidate.any(axis=-1) & pred_ok[:, p, None]  # (Q, T)
        chosen = np.take_along_axis(gt_order, candidate.argmax(axis=-1)[..., None], axis=-1)[..., 0]
        q_idx, t_idx = np.nonzero(hit)
        locked[q_idx, t_idx, chosen[q_idx, t_idx]] = True
        tp[:, :, p] = hit
        fp[:, :, p] = pred_ok[:, p, None] & ~hit

    tp_sum = np.cumsum(tp, axis=-1)
    fp_sum = np.cumsum(fp, axis=-1)
    recall = tp_sum / gt_ok.sum(axis=1)[:, None, None]
    precision = tp_sum / (tp_sum + fp_sum)
    edge = np.zeros((n_query, len(thresholds), 1))
    precision = np.concatenate([edge, precision, edge], axis=-1)
    recall = np.concatenate([edge, recall, edge + 1.0], axis=-1)
    precision = np.maximum.accumulate(precision[..., ::-1], axis=-1)[..., ::-1]
    terms = np.diff(recall, axis=-1) * precision[..., 1:]
    ap = np.zeros((n_query, len(thresholds)))
    for i in range(terms.shape[-1]):  # left to right, like the reference's sum over the recall steps
        ap += terms[..., i]
    return ap


def best_window_ious(
    windows: Sequence[np.ndarray], moments: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 and best-of-top-5 IoU of every query.

    Top-1: the first window (file order, not re-sorted) against the ground-truth window of highest
    true IoU (first on ties). Top-5: the (window, ground truth) pair of highest true IoU among the
    first :data:`RECALL_AT` windows (first in row-major order on ties). Both are then scored with
    :func:`spanned_iou`.

    Args:
        windows: per query ``(N_i, 3)``, ``N_i >= 1``.
        moments: per query ``(M_i, 2)``, ``M_i >= 1``.

    Returns:
        ``(Q,)`` top-1 IoU, ``(Q,)`` top-5 IoU.
    """
    pred, pred_ok = _pad([w[:RECALL_AT] for w in windows], 2)
    gt, gt_ok = _pad(moments, 2)
    n_query, n_gt = gt.shape[:2]
    rows = np.arange(n_query)

    iou = temporal_iou(pred, gt)  # (Q, 5, G)
    iou[~(pred_ok[:, :, None] & gt_ok[:, None, :])] = -1.0
    best_gt = iou[:, 0, :].argmax(axis=1)
    top1 = spanned_iou(pred[:, 0], gt[rows, best_gt])

    flat = iou.reshape(n_query, -1).argmax(axis=1)
    top5 = spanned_iou(pred[rows, flat // n_gt], gt[rows, flat % n_gt])
    return top1, top5


def retrieval_scores(windows: Sequence[np.ndarray], moments: Sequence[np.ndarray]) -> dict[str, Any]:
    """Metrics of one set of queries: ``MR-mIoU``, ``MR-mAP`` (per threshold + ``average``), ``MR-R1``,
    ``MR-R5``.

    Args:
        windows: per query ``(N_i, 3)`` ``[start, end, score]`` seconds, ``N_i >= 1``.
        moments: per query ``(M_i, 2)`` ground truth seconds, ``M_i >= 1``.
    """
    ap = average_precision(windows, moments).mean(axis=0)
    mean_ap = {str(t): percent(v) for t, v in zip(MAP_THRESHOLDS, ap, strict=True)}
    mean_ap["average"] = percent(float(np.mean(ap)))
    top1, top5 = best_window_ious(windows, moments)
    return {
        "MR-mIoU": percent(float(np.mean(top1))),
        "MR-mAP": mean_ap,
        "MR-R1": {str(t): percent(float(np.mean(top1 >= t))) for t in RECALL_THRESHOLDS},
        "MR-R5": {str(t): percent(float(np.mean(top5 >= t))) for t in RECALL_THRESHOLDS},
    }


def eval_moment_retrieval(pairs: Sequence[tuple[QueryPrediction, Query]]) -> dict[str, dict[str, Any]]:
    """Moment-retrieval metrics per length bucket (``short``, ``middle``, ``long``, ``full``).

    A bucket keeps, per query, the ground-truth windows in its length range and drops queries
    left with none. A bucket without any query is left out (the official script would instead
    repeat the ``full`` numbers under its name).

    Raises:
        PredictionError: a query without predicted windows or without ground-truth windows.
    """
    windows, moments = [], []
    for pred, query in pairs:
        if pred.windows is None or len(pred.windows) == 0:
            raise PredictionError(
                f"qid {pred.qid!r}: no predicted windows ('pred_relevant_windows' is missing or empty)"
            )
        if not query.moments:
            raise PredictionError(
                f"qid {query.qid!r}: the annotation has no ground-truth windows; "
                f"score a split that has ground truth"
            )
        windows.append(np.asarray(pred.windows, dtype=np.float64).reshape(-1, 3))
        moments.append(np.asarray(query.moments, dtype=np.float64).reshape(-1, 2))

    results: dict[str, dict[str, Any]] = {}
    for name, low, high in LENGTH_BUCKETS:
        if name == "full":
            results[name] = retrieval_scores(windows, moments)
            continue
        kept_windows, kept_moments = [], []
        for w, m in zip(windows, moments, strict=True):
            length = m[:, 1] - m[:, 0]
            inside = m[(length > low) & (length <= high)]
            if len(inside):
                kept_windows.append(w)
                kept_moments.append(inside)
        if kept_moments:
            results[name] = retrieval_scores(kept_windows, kept_moments)
    return results


def retrieval_brief(buckets: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The flat headline keys (``MR-full-mAP``, ``MR-full-R1@0.5``, …) in R²-Tuning's order (sorted)."""
    brief: dict[str, float] = {}
    full = buckets["full"]
    brief["MR-full-mAP"] = full["MR-mAP"]["average"]
    brief["MR-full-mAP@0.5"] = full["MR-mAP"]["0.5"]
    brief["MR-full-mAP@0.75"] = full["MR-mAP"]["0.75"]
    for name, scores in buckets.items():
        brief[f"MR-{name}-mIoU"] = scores["MR-mIoU"]
        if name != "full":
            brief[f"MR-{name}-mAP"] = scores["MR-mAP"]["average"]
    for k in (1, 5):
        for t in ("0.3", "0.5", "0.7"):
            brief[f"MR-full-R{k}@{t}"] = full[f"MR-R{k}"][t]
    return dict(sorted(brief.items()))


def eval_grounding(
    predictions: Sequence[QueryPrediction | Mapping[str, Any]],
    ground_truth: Sequence[Query],
    allow_missing: bool = False,
) -> dict[str, Any]:
    """Charades-STA / TACoS / Ego4D-NLQ (moment retrieval only).

    Args:
        predictions: one per query, windows in seconds (submission-format dicts are accepted).
        ground_truth: annotated queries (``Query.moments`` in seconds).
        allow_missing: score only the queries present in both.

    Returns:
        ``{"brief": {flat headline keys}, "full": {...}, "short": {...}, ...}``, the buckets as
        :func:`eval_moment_retrieval` gives them.
    """
    buckets = eval_moment_retrieval(pair_with_ground_truth(predictions, ground_truth, allow_missing))
    return {"brief": retrieval_brief(buckets), **dict(sorted(buckets.items()))}
