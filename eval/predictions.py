"""Prediction files in the QVHighlights submission format, and pairing them with ground truth.

One JSON object per line (JSON Lines)::

    {"qid": 2579, "query": "A man is talking.", "vid": "NUsG9BgSes0_210.0_360.0",
     "pred_relevant_windows": [[start_s, end_s, score], ...],
     "pred_saliency_scores": [one score per clip, ...]}

These are the records of the official leaderboard's ``hl_{val,test}_submission.jsonl``.
``pred_relevant_windows`` (seconds) is what moment retrieval is scored on, in file order (the
first row is the top-1 prediction); ``pred_saliency_scores`` (one per clip, higher = more
salient) is what highlight detection is scored on. A line needs at least one of the two;
``query`` and ``vid`` are optional, other keys are ignored. Problems are reported as
:class:`PredictionError` ``file:line: ...``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shards.atomic import atomic_path
from shards.errors import R2Error
from shards.jsonl import read_json_objects
from shards.schema import Query

WINDOWS_KEY = "pred_relevant_windows"
SALIENCY_KEY = "pred_saliency_scores"
_SHOWN_IDS = 5


class PredictionError(R2Error):
    """A malformed prediction file, or predictions that do not cover the annotated queries."""


@dataclass
class QueryPrediction:
    """The predictions of one query.

    Attributes:
        qid: query id, as in the annotation file.
        vid: video id, or ``None`` when the file does not give it.
        windows: ``(N, 3)`` float64 ``[start_s, end_s, score]`` rows in file order, or ``None``.
        saliency: ``(T,)`` float64 score per clip, or ``None``.
        query: the sentence, or ``None`` when the file does not give it.
    """

    qid: int | str
    vid: str | None = None
    windows: np.ndarray | None = None
    saliency: np.ndarray | None = None
    query: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The submission-format record, keys in the official order (those without a value are left out)."""
        record: dict[str, Any] = {"qid": self.qid}
        if self.query is not None:
            record["query"] = self.query
        if self.vid is not None:
            record["vid"] = self.vid
        if self.windows is not None:
            record[WINDOWS_KEY] = np.asarray(self.windows, dtype=np.float64).reshape(-1, 3).tolist()
        if self.saliency is not None:
            record[SALIENCY_KEY] = np.asarray(self.saliency, dtype=np.float64).reshape(-1).tolist()
        return record


def read_predictions(path: str | Path) -> list[QueryPrediction]:
    """Read a prediction JSON Lines file, in file order; blank lines are skipped.

    Raises:
        PredictionError: missing / unreadable file, malformed JSON, a bad field or a duplicate
            query id (``file:line: ...``), or a file without predictions.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise PredictionError(
            f"{path}: prediction file {what}; pass the .jsonl file written by r2 train/predict"
        )
    predictions: list[QueryPrediction] = []
    first_line: dict[str, int] = {}
    for number, record in read_json_objects(path, PredictionError):
        where = f"{path}:{number}"
        prediction = parse_record(record, where)
        key = str(prediction.qid)
        if key in first_line:
            raise PredictionError(
                f"{where}: duplicate qid {prediction.qid!r} (first on line {first_line[key]}); "
                f"give each query one line"
            )
        first_line[key] = number
        predictions.append(prediction)
    if not predictions:
        raise PredictionError(f"{path}: the prediction file holds no records")
    return predictions


def parse_record(record: Any, where: str = "prediction") -> QueryPrediction:
    """Validate one submission-format record (a decoded JSON object) into a :class:`QueryPrediction`.

    Args:
        record: the decoded object.
        where: location used as the message prefix, e.g. ``preds.jsonl:12``.

    Raises:
        PredictionError: a missing or mistyped field, a window that is not ``[start, end, score]``
            with finite numbers and ``start <= end``, or neither windows nor saliency.
    """
    if not isinstance(record, Mapping):
        raise PredictionError(f"{where}: expected a JSON object, got {type(record).__name__}")
    qid = record.get("qid")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise PredictionError(f"{where}: field 'qid' must be an integer or a string, got {qid!r}")
    vid = record.get("vid")
    if vid is not None and not isinstance(vid, str):
        raise PredictionError(f"{where}: field 'vid' must be a string, got {vid!r}")
    query = record.get("query")
    if query is not None and not isinstance(query, str):
        raise PredictionError(f"{where}: field 'query' must be a string, got {query!r}")
    windows = record.get(WINDOWS_KEY)
    saliency = record.get(SALIENCY_KEY)
    if windows is None and saliency is None:
        raise PredictionError(f"{where}: the record has neither '{WINDOWS_KEY}' nor '{SALIENCY_KEY}'")
    return QueryPrediction(
        qid=qid,
        vid=vid,
        windows=None if windows is None else _windows(windows, where),
        saliency=None if saliency is None else _saliency(saliency, where),
        query=query,
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _windows(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, list):
        raise PredictionError(f"{where}: field '{WINDOWS_KEY}' must be a list of [start, end, score]")
    for i, row in enumerate(value):
        if not (isinstance(row, list) and len(row) == 3 and all(_is_number(x) for x in row)):
            raise PredictionError(
                f"{where}: {WINDOWS_KEY}[{i}] must be [start_s, end_s, score] with finite numbers, "
                f"got {row!r}"
            )
        if row[0] > row[1]:
            raise PredictionError(f"{where}: {WINDOWS_KEY}[{i}] starts after it ends: {row!r}")
    return np.asarray(value, dtype=np.float64).reshape(-1, 3)


def _saliency(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, list) or not all(_is_number(x) for x in value):
        raise PredictionError(f"{where}: field '{SALIENCY_KEY}' must be a list of finite numbers")
    return np.asarray(value, dtype=np.float64)


def as_prediction(item: QueryPrediction | Mapping[str, Any]) -> QueryPrediction:
    """Accept a :class:`QueryPrediction` or a submission-format dict (validated)."""
    return item if isinstance(item, QueryPrediction) else parse_record(item)


def write_predictions(path: str | Path, predictions: Iterable[QueryPrediction | Mapping[str, Any]]) -> None:
    """Write predictions as JSON Lines atomically (temporary file in the same folder, then rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for item in predictions:
            f.write(json.dumps(as_prediction(item).to_dict()) + "\n")


def pair_with_ground_truth(
    predictions: Sequence[QueryPrediction | Mapping[str, Any]],
    ground_truth: Sequence[Query],
    allow_missing: bool = False,
) -> list[tuple[QueryPrediction, Query]]:
    """Match predictions to annotated queries by qid (compared as strings), in annotation order.

    Args:
        predictions: one per query (dicts in the submission format are accepted).
        ground_truth: the annotated queries.
        allow_missing: score only the queries present in both instead of failing.

    Raises:
        PredictionError: the qid sets differ (and ``allow_missing`` is off), or nothing is shared;
            the message lists a few missing and extra qids.
    """
    by_qid = {}
    for item in predictions:
        pred = as_prediction(item)
        if str(pred.qid) in by_qid:
            raise PredictionError(f"qid {pred.qid!r} is predicted twice; give each query one prediction")
        by_qid[str(pred.qid)] = pred
    gt_keys = {str(q.qid) for q in ground_truth}
    missing = [q.qid for q in ground_truth if str(q.qid) not in by_qid]
    extra = [p.qid for key, p in by_qid.items() if key not in gt_keys]
    pairs = [(by_qid[str(q.qid)], q) for q in ground_truth if str(q.qid) in by_qid]
    if (missing or extra) and not allow_missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} annotated queries have no prediction (e.g. {_few(missing)})")
        if extra:
            parts.append(f"{len(extra)} predicted qids are not in the annotations (e.g. {_few(extra)})")
        raise PredictionError(
            "predictions and annotations cover different queries: "
            + "; ".join(parts)
            + "; check that both are the same split, or pass --allow-missing to score the shared queries"
        )
    if not pairs:
        raise PredictionError(
            "no predicted qid is in the annotations; check that both files are the same dataset"
        )
    return pairs


def _few(ids: list[int | str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_SHOWN_IDS])
    return shown + (", ..." if len(ids) > _SHOWN_IDS else "")
