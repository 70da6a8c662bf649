"""QVHighlights: moment retrieval (see :mod:`eval.grounding`) plus highlight detection.

Highlight detection scores ``pred_saliency_scores`` (one per 2-s clip) against the three
workers' 0–4 ratings, binarised at Fair (≥ 2), Good (≥ 3) and VeryGood (≥ 4):

* ``HL-mAP``: per query and worker, the average precision of sklearn's
  ``precision_recall_curve`` with interpolation (re-implemented here in numpy, see
  :func:`saliency_average_precision`); mean over all (query, worker) pairs.
* ``HL-Hit1``: whether the top-scored clip is positive for at least one worker; mean over queries.

Numbers are percentages rounded to 2 decimals, as the official script reports them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eval.grounding import eval_moment_retrieval, percent, retrieval_brief
from eval.predictions import PredictionError, QueryPrediction, pair_with_ground_truth
from shards.schema import Query

CLIP_SECONDS = 2.0
"""Length of one rated clip."""
WORKERS = 3
LEVELS: tuple[tuple[str, int], ...] = (("Fair", 2), ("Good", 3), ("VeryGood", 4))
"""``(name, minimum rating)`` of a positive clip."""


def rating_matrix(query: Query) -> np.ndarray:
    """The ``(int(duration / 2), 3)`` worker ratings of every clip (0 for clips that were not rated).

    Raises:
        PredictionError: the query has no ``clip_ids`` / ``scores`` saliency, or a rated clip
            lies beyond the video.
    """
    saliency = query.saliency or {}
    if "clip_ids" not in saliency or "scores" not in saliency:
        raise PredictionError(
            f"qid {query.qid!r}: the annotation has no saliency ratings (relevant_clip_ids / saliency_scores)"
        )
    ratings = np.zeros((int(query.duration / CLIP_SECONDS), WORKERS))
    ids = np.asarray(saliency["clip_ids"], dtype=np.int64)
    if len(ids) and ids.max() >= len(ratings):
        raise PredictionError(
            f"qid {query.qid!r}: rated clip {int(ids.max())} lies beyond the {len(ratings)} clips "
            f"of a {query.duration} s video"
        )
    ratings[ids] = np.asarray(saliency["scores"], dtype=np.float64).reshape(len(ids), WORKERS)
    return ratings


def saliency_average_precision(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Interpolated AP of one score vector against several binary label columns.

    For a column with both classes this equals the official ``get_ap``: the precision / recall
    points of sklearn's ``precision_recall_curve`` (one point per distinct score, highest score
    last, plus the final point precision 1, recall 0), precision made a running maximum from the
    first point on, recall cast to float32, and AP = mean precision at the points where recall
    changes to the next point. A column of all 0 gives 0, all 1 gives 1.

    Args:
        labels: ``(n, K)`` 0/1 labels of ``n`` clips.
        scores: ``(n,)`` predicted scores.

    Returns:
        ``(K,)`` AP in [0, 1].
    """
    n, k = labels.shape
    order = np.argsort(scores, kind="mergesort")[::-1]
    ranked = scores[order]
    cuts = np.r_[np.nonzero(np.diff(ranked))[0], n - 1]
    tps = np.cumsum(labels[order], axis=0)[cuts]  # (m, K) true positives above each threshold
    positives = tps[-1]
    mixed = (positives > 0) & (positives < n)
    precision = tps / (cuts + 1)[:, None]
    recall = np.divide(tps, positives, out=np.zeros_like(tps), where=positives > 0)
    precision = np.vstack([precision[::-1], np.ones((1, k))])
    recall = np.vstack([recall[::-1], np.zeros((1, k))]).astype(np.float32)
    precision = np.maximum.accumulate(precision, axis=0)
    step = recall[1:] != recall[:-1]
    ap = (positives == n).astype(np.float64)
    for j in np.nonzero(mixed)[0]:
        ap[j] = np.mean(precision[:-1, j][step[:, j]])
    return ap


def eval_highlight(pairs: Sequence[tuple[QueryPrediction, Query]]) -> dict[str, dict[str, float]]:
    """``{"HL-min-Fair": {"HL-mAP": .., "HL-Hit1": ..}, "HL-min-Good": .., "HL-min-VeryGood": ..}``.

    Per query the predicted scores are cut or zero-padded to the annotated clip count for the
    AP; Hit@1 uses the arg-max of the full score list (first on ties; a clip beyond the video
    is a miss).

    Raises:
        PredictionError: a query without predicted saliency or without ratings.
    """
    thresholds = np.repeat([minimum for _, minimum in LEVELS], WORKERS)  # (9,) level-major
    ap = np.zeros((len(pairs), len(LEVELS) * WORKERS))
    hit = np.zeros((len(pairs), len(LEVELS)))
    for i, (pred, query) in enumerate(pairs):
        if pred.saliency is None or len(pred.saliency) == 0:
            raise PredictionError(f"qid {pred.qid!r}: no predicted saliency ('pred_saliency_scores')")
        ratings = rating_matrix(query)
        labels = (np.tile(ratings, len(LEVELS)) >= thresholds).astype(np.float64)  # (n, 9)
        n = len(ratings)
        scores = np.zeros(n)
        scores[: min(n, len(pred.saliency))] = pred.saliency[:n]
        if n:
            ap[i] = saliency_average_precision(labels, scores)
        top = int(np.argmax(pred.saliency))
        if top < n:
            hit[i] = labels[top].reshape(len(LEVELS), WORKERS).max(axis=1)
    return {
        f"HL-min-{name}": {
            "HL-mAP": percent(float(np.mean(np.ascontiguousarray(ap[:, j * WORKERS : (j + 1) * WORKERS])))),
            "HL-Hit1": percent(float(np.mean(hit[:, j]))),
        }
        for j, (name, _) in enumerate(LEVELS)
    }


def _has_ratings(query: Query) -> bool:
    return query.saliency is not None and "clip_ids" in query.saliency


def eval_qvhighlights(
    predictions: Sequence[QueryPrediction | Mapping[str, Any]],
    ground_truth: Sequence[Query],
    allow_missing: bool = False,
) -> dict[str, Any]:
    """QVHighlights moment retrieval and, when both sides have saliency, highlight detection.

    Args:
        predictions: one per query (submission-format dicts are accepted).
        ground_truth: annotated queries.
        allow_missing: score only the queries present in both.

    Returns:
        The official layout: ``{"brief": {...}, "HL-min-Fair": {...}, ..., "full": {...}, ...}``;
        ``brief`` holds ``MR-full-mAP``, ``MR-full-R1@0.5``, ``HL-min-VeryGood-mAP``, … .

    Raises:
        PredictionError: qid sets differ, or saliency is given for only some queries.
    """
    pairs = pair_with_ground_truth(predictions, ground_truth, allow_missing)
    retrieval = eval_moment_retrieval(pairs) if any(p.windows is not None for p, _ in pairs) else {}
    highlight: dict[str, dict[str, float]] = {}
    with_saliency = [p.qid for p, _ in pairs if p.saliency is not None]
    if with_saliency and all(_has_ratings(q) for _, q in pairs):
        if len(with_saliency) != len(pairs):
            missing = next(p.qid for p, _ in pairs if p.saliency is None)
            raise PredictionError(
                f"qid {missing!r}: no 'pred_saliency_scores' although other queries have them; "
                f"give saliency for every query or for none"
            )
        highlight = eval_highlight(pairs)
    if not retrieval and not highlight:
        raise PredictionError(
            "nothing to score: the predictions have no windows and the annotations no saliency"
        )
    brief = retrieval_brief(retrieval) if retrieval else {}
    for level, scores in highlight.items():
        brief[f"{level}-mAP"] = scores["HL-mAP"]
        brief[f"{level}-Hit1"] = scores["HL-Hit1"]
    return {"brief": brief, **dict(sorted({**retrieval, **highlight}.items()))}
