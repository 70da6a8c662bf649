"""One entry point for every dataset's official metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from eval.grounding import eval_grounding
from eval.highlights import tvsum_top5_map, youtube_map
from eval.predictions import QueryPrediction
from eval.qvhighlights import eval_qvhighlights
from shards.datasets import get_dataset
from shards.schema import Query


def evaluate(
    dataset: str,
    predictions: Sequence[QueryPrediction | Mapping[str, Any]],
    ground_truth: Sequence[Query],
    allow_missing: bool = False,
) -> dict[str, Any]:
    """Score predictions with the official metrics of ``dataset``, as given (no post-processing).

    Args:
        dataset: registry name or alias (``qvhighlights``, ``charades``, ``tacos``, ``ego4d``,
            ``youtube``, ``tvsum``, ``custom``); its registry entry names the metrics (``evaluator``).
        predictions: one per query: :class:`~eval.predictions.QueryPrediction` or a
            submission-format dict. Windows in seconds.
        ground_truth: the annotated queries (:func:`shards.annotations.load_annotations`).
        allow_missing: score only the queries present in both instead of failing.

    Returns:
        ``{"brief": {flat headline metric: value}, ...details}``; values are percentages rounded
        to 2 decimals. QVHighlights / Charades-STA / TACoS / Ego4D-NLQ use the official layout
        (``brief`` with ``MR-full-mAP``, ``MR-full-R1@0.5``, ``HL-min-VeryGood-mAP``, …, then one
        block per length bucket and HL level); YouTube Highlights / TVSum give
        ``{domain}-mAP`` and ``mAP`` in ``brief`` plus ``domains``.

    Raises:
        UnknownDatasetError: unknown dataset.
        PredictionError: the predictions do not cover the annotated queries or lack the fields
            the dataset is scored on.
    """
    spec = get_dataset(dataset)
    if spec.evaluator == "qvhighlights":
        return eval_qvhighlights(predictions, ground_truth, allow_missing)
    if spec.evaluator == "youtube":
        return youtube_map(predictions, ground_truth, allow_missing, spec.domains)
    if spec.evaluator == "tvsum":
        return tvsum_top5_map(predictions, ground_truth, allow_missing, spec.domains)
    return eval_grounding(predictions, ground_truth, allow_missing)

