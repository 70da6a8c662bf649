"""``r2 eval``: score a prediction file against an annotation file with the official metrics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer

from eval.metrics import evaluate
from eval.postprocess import postprocess_for
from eval.predictions import QueryPrediction, read_predictions
from eval.table import format_table
from shards.annotations import infer_split, load_annotations
from shards.atomic import atomic_path
from shards.cliutil import USER_ERROR_EXIT, user_errors
from shards.datasets import DatasetSpec, dataset_names, get_dataset
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


def eval_command(
    dataset: str = typer.Option(..., "--dataset", "-d", help=f"One of: {', '.join(dataset_names())}."),
    predictions: Path = typer.Option(
        ...,
        "--predictions",
        "-p",
        help="Prediction JSON Lines (qid, pred_relevant_windows, pred_saliency_scores).",
    ),
    annotations: Path = typer.Option(
        ..., "--annotations", "-a", help="The dataset's annotation file (same split)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the official metric keys as JSON instead of a table."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Also write the metrics as JSON to this file."),
    allow_missing: bool = typer.Option(
        False, "--allow-missing", help="Score only the queries present in both files instead of failing."
    ),
    postprocess: bool = typer.Option(
        False,
        "--postprocess",
        help="Post-process raw windows (e.g. Grounder.predict output) as validation does first: clamp to "
        "the annotated duration, round to the dataset's clip unit, NMS.",
    ),
) -> None:
    """Score a prediction file with the dataset's official metrics (as given, unless --postprocess)."""
    with user_errors():
        spec = get_dataset(dataset)
        ground_truth = load_annotations(spec.name, annotations, _split(spec, annotations))
        preds = read_predictions(predictions)
        if postprocess:
            preds = _postprocessed(spec, preds, ground_truth)
        metrics = evaluate(spec.name, preds, ground_truth, allow_missing)
    if out is not None:
        try:
            with atomic_path(out) as tmp:
                tmp.write_text(json.dumps(metrics, indent=4) + "\n", encoding="utf-8")
        except OSError as err:
            typer.echo(f"error: cannot write {out}: {err.strerror}; choose a writable --out path", err=True)
            raise typer.Exit(USER_ERROR_EXIT) from err
    if as_json:
        typer.echo(json.dumps(metrics, indent=4))
    else:
        typer.echo(format_table(metrics, title=f"{spec.title}: {predictions.name} vs {annotations.name}"))
