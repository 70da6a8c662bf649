"""Prediction files: round trip, file:line errors, pairing with the annotations."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from eval.predictions import (
    PredictionError,
    QueryPrediction,
    pair_with_ground_truth,
    read_predictions,
    write_predictions,
)
from shards.errors import R2Error
from shards.schema import Query


def test_round_trip(tmp_path):
    preds = [
        QueryPrediction(
            qid=7, vid="v7", windows=np.array([[0.0, 4.0, 0.9], [2.0, 8.0, 0.25]]), saliency=None
        ),
        {"qid": "yt1", "pred_saliency_scores": [0.5, -1.25]},
    ]
    path = tmp_path / "out" / "preds.jsonl"
    write_predictions(path, preds)
    assert [p.name for p in path.parent.iterdir()] == ["preds.jsonl"]  # no temporary file left
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {
        "qid": 7,
        "vid": "v7",
        "pred_relevant_windows": [[0, 4, 0.9], [2, 8, 0.25]],
    }
    back = read_predictions(path)
    assert (
        back[0].qid == 7
        and back[0].windows.tolist() == [[0, 4, 0.9], [2, 8, 0.25]]
        and back[0].saliency is None
    )
    assert back[1].qid == "yt1" and back[1].saliency.tolist() == [0.5, -1.25] and back[1].windows is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"qid": 2, "pred_relevant_windows": [[0, 1, 0.5]', "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"qid": true, "pred_saliency_scores": [1]}', "'qid' must be an integer or a string"),
        ('{"qid": 2}', "neither 'pred_relevant_windows' nor 'pred_saliency_scores'"),
        (
            '{"qid": 2, "pred_relevant_windows": [[0, 1]]}',
            r"pred_relevant_windows[0] must be [start_s, end_s, score]",
        ),
        ('{"qid": 2, "pred_relevant_windows": [[5, 1, 0.3]]}', "starts after it ends"),
        ('{"qid": 2, "pred_relevant_windows": [[0, 1, NaN]]}', "finite numbers"),
        (
            '{"qid": 2, "pred_saliency_scores": [0.1, "x"]}',
            "'pred_saliency_scores' must be a list of finite numbers",
        ),
        ('{"qid": 1, "pred_saliency_scores": [1]}', "duplicate qid 1 (first on line 1)"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"qid": 1, "pred_saliency_scores": [1]}\n\n' + line + "\n")
    with pytest.raises(PredictionError, match="^" + re.escape(f"{path}:3: ")) as err:
        read_predictions(path)
    assert message in str(err.value)
    assert isinstance(err.value, R2Error)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(PredictionError, match="prediction file not found"):
        read_predictions(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(PredictionError, match="holds no records"):
        read_predictions(tmp_path / "empty.jsonl")


def _gt(qids):
    return [Query(vid="v", qid=q, text="t", duration=10.0, split="val", moments=[[0, 1]]) for q in qids]


def test_pairing_by_qid():
    preds = [{"qid": "2", "pred_saliency_scores": [1]}, {"qid": 1, "pred_saliency_scores": [2]}]
    pairs = pair_with_ground_truth(preds, _gt([1, 2]))
    assert [(p.qid, q.qid) for p, q in pairs] == [(1, 1), ("2", 2)]  # annotation order; "2" matches 2


def test_pairing_mismatch_lists_ids():
    preds = [{"qid": q, "pred_saliency_scores": [1]} for q in [1, 2, 99]]
    with pytest.raises(PredictionError) as err:
        pair_with_ground_truth(preds, _gt(range(1, 10)))
    text = str(err.value)
    assert "7 annotated queries have no prediction (e.g. 3, 4, 5, 6, 7, ...)" in text
    assert "1 predicted qids are not in the annotations (e.g. 99)" in text
    assert "--allow-missing" in text
    pairs = pair_with_ground_truth(preds, _gt(range(1, 10)), allow_missing=True)
    assert [p.qid for p, _ in pairs] == [1, 2]
    with pytest.raises(PredictionError, match="no predicted qid is in the annotations"):
        pair_with_ground_truth(preds[2:], _gt([1]), allow_missing=True)
    with pytest.raises(PredictionError, match="qid 1 is predicted twice"):
        pair_with_ground_truth(preds[:1] * 2, _gt([1]))
