"""The file mode of ``r2 eval``: score a prediction file against an annotation file with the official
metrics (the command itself, which also scores checkpoints, is ``r2/eval_cli.py``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from eval.metrics import evaluate
from eval.postprocess import postprocess_for
from eval.predictions import QueryPrediction, read_predictions
from shards.annotation_files import infer_split
from shards.annotations import load_annotations
from shards.datasets import DatasetSpec, get_dataset
from shards.schema import Query


def _split(spec: DatasetSpec, path: Path) -> str:
    """The split named by the file name, else any valid split: scoring does not depend on it."""
    split = infer_split(path)
    return split if split in spec.splits else spec.splits[-1]


def _postprocessed(
    spec: DatasetSpec, predictions: list[QueryPrediction], ground_truth: list[Query]
) -> list[QueryPrediction]:
    """``predictions`` with their windows post-processed for ``spec`` (:func:`postprocess_for`), each
    clamped to its annotated duration; predictions of unannotated qids are left as they are."""
    durations = {str(q.qid): q.duration for q in ground_truth}
    return [
        dataclasses.replace(p, windows=postprocess_for(spec, p.windows, durations[str(p.qid)]))
        if p.windows is not None and str(p.qid) in durations
        else p
        for p in predictions
    ]


def score_file(
    dataset: str,
    predictions: str | Path,
    annotations: str | Path,
    allow_missing: bool = False,
    postprocess: bool = False,
) -> tuple[DatasetSpec, dict[str, Any]]:
    """Score a prediction file (submission format) against a dataset's annotation file.

    Args:
        dataset: dataset registry name or alias.
        predictions: prediction JSON Lines (:func:`eval.predictions.read_predictions`).
        annotations: the dataset's annotation file of the same split.
        allow_missing: score only the queries present in both files instead of failing.
        postprocess: post-process raw windows as validation does first (clamp to the annotated
            duration, round to the clip unit, NMS); otherwise the file is scored as given.

    Returns:
        the dataset and the evaluator's result (:func:`eval.metrics.evaluate`).

    Raises:
        UnknownDatasetError, AnnotationError, PredictionError: bad name, file or query ids.
    """
    spec = get_dataset(dataset)
    path = Path(annotations)
    ground_truth = load_annotations(spec.name, path, _split(spec, path))
    preds = read_predictions(predictions)
    if postprocess:
        preds = _postprocessed(spec, preds, ground_truth)
    return spec, evaluate(spec.name, preds, ground_truth, allow_missing)
