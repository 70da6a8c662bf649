"""Highlight-detection metrics of YouTube Highlights (mAP) and TVSum (top-5 mAP), per domain.

Both rank a video's clips by ``pred_saliency_scores`` (descending; equal scores keep clip
order) and score the ranked 0/1 labels with the trapezoid AP of R²-Tuning::

    AP = Σ_i (rec_i − rec_{i−1}) · (prec_{i−1} + prec_i) / 2,   rec_0 = 0, prec_0 = 1

(0 when no positive is ranked). YouTube Highlights: positives are clips with ``match > 0``,
the whole ranking counts, mAP = mean over a domain's videos. TVSum: for each of the 20
annotators a clip is positive when its score is above that annotator's median for the video
(the lower middle value for an even count), only the top 5 ranked clips count (positives are
counted inside them too); mAP = mean over videos, then over annotators. Results are
percentages rounded to 2 decimals: ``{domain}-mAP`` per domain and ``mAP`` = mean over the
domains present.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from eval.grounding import percent
from eval.predictions import PredictionError, QueryPrediction, pair_with_ground_truth
from shards.schema import Query

TVSUM_TOP = 5
"""TVSum scores only the 5 top-ranked clips."""


def ranked_average_precision(labels: np.ndarray) -> float:
    """Trapezoid AP of 0/1 labels in ranked order, ``(n,)``; 0 when there is no positive.

    Summed left to right in the reference's operation order, so results match it to the bit.
    """
    labels = np.asarray(labels, dtype=np.float64)
    positives = labels.sum()
    if positives == 0:
        return 0.0
    hits = np.cumsum(labels)
    recall = hits / positives
    precision = hits / np.arange(1, len(labels) + 1)
    prev_recall = np.r_[0.0, recall[:-1]]
    prev_precision = np.r_[1.0, precision[:-1]]
    terms = (recall - prev_recall) * (prev_precision + precision) / 2
    return float(np.cumsum(terms)[-1])


def _ranking(saliency: np.ndarray, length: int) -> np.ndarray:
    """Clip indices of the first ``length`` scores, best first (stable)."""
    return np.argsort(-np.asarray(saliency, dtype=np.float64)[:length], kind="stable")


def youtube_video_ap(saliency: np.ndarray, match: Sequence[float]) -> float:
    """AP of one YouTube Highlights video.

    Args:
        saliency: ``(T,)`` predicted score per clip.
        match: annotated ``match`` per clip (-1 / 0 / 1); positives are ``> 0``. When the two
            lengths differ, only the first ``min`` clips are scored.
    """
    labels = np.asarray(match, dtype=np.float64) > 0
    order = _ranking(saliency, min(len(saliency), len(labels)))
    return ranked_average_precision(labels[order])


def lower_median(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Median that takes the lower middle value for an even count (``torch.median`` semantics)."""
    return np.take(np.sort(values, axis=axis), (values.shape[axis] - 1) // 2, axis=axis)


def tvsum_video_ap(saliency: np.ndarray, scores: np.ndarray, top: int = TVSUM_TOP) -> np.ndarray:
    """Top-``top`` AP of one TVSum video for each annotator.

    Args:
        saliency: ``(T,)`` predicted score per 2-s clip.
        scores: ``(n, A)`` annotator scores per clip (A = 20, values 1..5). The median of each
            annotator is taken over all ``n`` clips; only the first ``min(T, n)`` clips are ranked.

    Returns:
        ``(A,)`` AP per annotator.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = scores > lower_median(scores, axis=0)
    order = _ranking(saliency, min(len(saliency), len(scores)))[:top]
    return np.array([ranked_average_precision(labels[order, a]) for a in range(scores.shape[1])])


def _mean(values: Sequence[float] | np.ndarray) -> float:
    """Sequential-sum mean, the reference's ``sum(values) / len(values)``."""
    return float(np.cumsum(values)[-1] / len(values))


def _by_domain(
    pairs: Sequence[tuple[QueryPrediction, Query]], video_ap: Callable[[np.ndarray, Query], Any]
) -> dict[str, list[Any]]:
    per_domain: dict[str, list[Any]] = {}
    for pred, query in pairs:
        if pred.saliency is None or len(pred.saliency) == 0:
            raise PredictionError(f"qid {pred.qid!r}: no predicted saliency ('pred_saliency_scores')")
        if query.domain is None:
            raise PredictionError(f"qid {query.qid!r}: the annotation has no domain")
        per_domain.setdefault(query.domain, []).append(video_ap(pred.saliency, query))
    return per_domain


def _report(
    domain_map: dict[str, float], per_domain: dict[str, list[Any]], order: Sequence[str]
) -> dict[str, Any]:
    """The result dict from the mAP of each domain; ``per_domain`` (one AP per video) gives the counts."""
    names = sorted(domain_map, key=lambda d: (order.index(d) if d in order else len(order), d))
    brief = {f"{d}-mAP": percent(domain_map[d]) for d in names}
    brief["mAP"] = percent(_mean([domain_map[d] for d in names]))
    return {
        "brief": brief,
        "domains": {d: {"mAP": percent(domain_map[d]), "videos": len(per_domain[d])} for d in names},
    }


def _saliency_field(query: Query, field: str) -> Any:
    if not query.saliency or field not in query.saliency:
        raise PredictionError(f"qid {query.qid!r}: the annotation has no saliency {field!r}")
    return query.saliency[field]


def youtube_map(
    predictions: Sequence[QueryPrediction | Mapping[str, Any]],
    ground_truth: Sequence[Query],
    allow_missing: bool = False,
    domains: Sequence[str] = (),
) -> dict[str, Any]:
    """YouTube Highlights mAP per domain and their mean.

    Args:
        predictions: one per video with ``saliency`` (submission dicts accepted).
        ground_truth: queries with ``saliency={"match": [...]}`` and ``domain``.
        allow_missing: score only the videos present in both.
        domains: preferred display order of the domains.

    Returns:
        ``{"brief": {"dog-mAP": .., ..., "mAP": ..}, "domains": {"dog": {"mAP": .., "videos": n}, ...}}``.
    """
    pairs = pair_with_ground_truth(predictions, ground_truth, allow_missing)
    per_domain = _by_domain(pairs, lambda s, q: youtube_video_ap(s, _saliency_field(q, "match")))
    return _report({d: _mean(aps) for d, aps in per_domain.items()}, per_domain, domains)


def tvsum_top5_map(
    predictions: Sequence[QueryPrediction | Mapping[str, Any]],
    ground_truth: Sequence[Query],
    allow_missing: bool = False,
    domains: Sequence[str] = (),
) -> dict[str, Any]:
    """TVSum top-5 mAP per domain and their mean.

    Args:
        predictions: one per video with ``saliency`` per 2-s clip (submission dicts accepted).
        ground_truth: queries with ``saliency={"scores": [[20 annotators], ...]}`` and ``domain``.
        allow_missing: score only the videos present in both.
        domains: preferred display order of the domains.

    Returns:
        ``{"brief": {"BK-mAP": .., ..., "mAP": ..}, "domains": {"BK": {"mAP": .., "videos": n}, ...}}``.
    """
    pairs = pair_with_ground_truth(predictions, ground_truth, allow_missing)
    per_domain = _by_domain(pairs, lambda s, q: tvsum_video_ap(s, np.asarray(_saliency_field(q, "scores"))))
    domain_map = {}
    for domain, aps in per_domain.items():
        per_annotator = np.stack(aps)  # (videos, annotators)
        domain_map[domain] = _mean([_mean(per_annotator[:, a]) for a in range(per_annotator.shape[1])])
    return _report(domain_map, per_domain, domains)
