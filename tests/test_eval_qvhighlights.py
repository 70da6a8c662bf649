"""QVHighlights metrics: every golden number of the official script on two real prediction files,
plus hand-worked highlight-detection cases."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from eval.predictions import PredictionError, read_predictions
from eval.qvhighlights import eval_qvhighlights, rating_matrix, saliency_average_precision
from shards.annotations import load_annotations
from shards.schema import Query

DATA = Path(__file__).parent / "data" / "eval"
GOLDEN = [
    ("moment_detr/sample_val_preds.jsonl", "moment_detr/sample_val_preds_metrics_raw.json"),
    ("qd_detr/best_hl_val_preds.jsonl", "qd_detr/best_hl_val_preds_metrics.json"),
]


@pytest.fixture(scope="module")
def val_gt() -> list[Query]:
    return load_annotations("qvhighlights", DATA / "qvhighlights" / "highlight_val_release.jsonl")


def _leaves(tree: dict, prefix: tuple = ()) -> dict[tuple, float]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


@pytest.mark.parametrize(("preds_file", "golden_file"), GOLDEN)
def test_reproduces_every_golden_number(val_gt, preds_file, golden_file):
    preds = read_predictions(DATA / preds_file)
    start = time.perf_counter()
    metrics = eval_qvhighlights(preds, val_gt)
    elapsed = time.perf_counter() - start
    golden = _leaves(json.loads((DATA / golden_file).read_text()))
    assert len(golden) == 104
    ours = _leaves(metrics)
    mismatches = {k: (v, ours.get(k)) for k, v in golden.items() if ours.get(k) != v}
    assert not mismatches
    # 1,550 queries: about a second on a loaded 2-core machine (generous bound against flakiness).
    assert elapsed < 8.0


def test_r2_tuning_extra_keys_present(val_gt):
    metrics = eval_qvhighlights(read_predictions(DATA / GOLDEN[1][0]), val_gt)
    brief = metrics["brief"]
    for key in ("MR-full-mIoU", "MR-short-mIoU", "MR-full-R1@0.3", "MR-full-R5@0.3", "MR-full-R5@0.7"):
        assert 0.0 <= brief[key] <= 100.0
    assert brief["MR-full-R5@0.5"] >= brief["MR-full-R1@0.5"]  # top-5 can only do better
    assert list(metrics["full"]["MR-R1"]) == [f"{t / 100:g}" for t in range(30, 100, 5)]
    assert list(brief)[-2:] == ["HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1"]


def test_saliency_ap_hand_worked():
    # sklearn-style PR points: one per distinct score, highest score last, then (P=1, R=0).
    # labels [1,0,1,0], scores [.9,.8,.7,.1]: TP cum [1,1,2,2], P [1,.5,2/3,.5], R [.5,.5,1,1]
    # reversed + end: P [.5,2/3,.5,1,1], R [1,1,.5,.5,0]; running max of P: [.5,2/3,2/3,1,1]
    # recall changes after index 1 and 3 -> AP = mean(2/3, 1) = 5/6
    labels = np.array([[1, 0, 1, 0]], dtype=float).T
    assert saliency_average_precision(labels, np.array([0.9, 0.8, 0.7, 0.1]))[0] == pytest.approx(5 / 6)
    # interpolation: labels [0,1,1], scores [.9,.8,.7]: P [0,.5,2/3], R [0,.5,1]
    # reversed + end: P [2/3,.5,0,1], R [1,.5,0,0]; running max [2/3,2/3,2/3,1]; steps at 0 and 1 -> 2/3
    labels = np.array([[0, 1, 1]], dtype=float).T
    assert saliency_average_precision(labels, np.array([0.9, 0.8, 0.7]))[0] == pytest.approx(2 / 3)


def test_saliency_ap_ties_share_one_threshold():
    # scores [.5,.5,.2,.2] give two thresholds: at .5 TP=1 of 2 (P .5, R .5), at .2 TP=2 of 4 (P .5, R 1)
    # reversed + end: P [.5,.5,1], R [1,.5,0]; steps at 0 and 1 -> AP = mean(.5, .5) = .5
    labels = np.array([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=float).T
    ap = saliency_average_precision(labels, np.array([0.5, 0.5, 0.2, 0.2]))
    assert ap[0] == pytest.approx(0.5)
    # second column: at .5 TP=1 (P .5, R .5), at .2 TP=2 (P .5, R 1) -> also .5
    assert ap[1] == pytest.approx(0.5)


def test_saliency_ap_single_class_columns():
    labels = np.array([[0, 0, 0], [1, 1, 1]], dtype=float).T
    assert saliency_average_precision(labels, np.array([0.3, 0.2, 0.1])).tolist() == [0.0, 1.0]


def _query(qid: int, duration: float, clip_ids: list[int], scores: list[list[int]]) -> Query:
    return Query(
        vid=f"v{qid}",
        qid=qid,
        text="q",
        duration=duration,
        split="val",
        moments=[[0.0, 2.0]],
        saliency={"clip_ids": clip_ids, "scores": scores},
    )


def test_highlight_detection_hand_worked():
    # Q1: 4 clips, ratings rows 0:[0,0,0] 1:[4,1,0] 2:[2,3,4] 3:[0,0,0]; pred [.1,.9,.5,.2] ranks 1,2,3,0.
    #   Fair (>=2): w0 [0,1,1,0] ranked first two -> AP 1; w1 [0,0,1,0] ranked 2nd -> AP .5; w2 same .5
    #   Good (>=3): w0 [0,1,0,0] -> 1; w1 [0,0,1,0] -> .5; w2 [0,0,1,0] -> .5
    #   VeryGood (>=4): w0 [0,1,0,0] -> 1; w1 all 0 -> 0; w2 [0,0,1,0] -> .5
    #   top clip 1 = [4,1,0]: a hit at every level.
    # Q2: 2 clips, ratings 0:[2,2,2]; pred [.3,.1,.9] cut to [.3,.1] for AP:
    #   Fair: [1,0] ranked first -> 1 for each worker; Good / VeryGood: all 0 -> 0.
    #   top clip 2 is past the 2 clips -> a miss.
    gt = [_query(1, 8.0, [1, 2], [[4, 1, 0], [2, 3, 4]]), _query(2, 4.0, [0], [[2, 2, 2]])]
    preds = [
        {"qid": 1, "pred_saliency_scores": [0.1, 0.9, 0.5, 0.2]},
        {"qid": 2, "pred_saliency_scores": [0.3, 0.1, 0.9]},
    ]
    metrics = eval_qvhighlights(preds, gt)
    assert metrics["HL-min-Fair"] == {"HL-mAP": 83.33, "HL-Hit1": 50.0}  # (1+.5+.5+1+1+1)/6
    assert metrics["HL-min-Good"] == {"HL-mAP": 33.33, "HL-Hit1": 50.0}  # (1+.5+.5)/6
    assert metrics["HL-min-VeryGood"] == {"HL-mAP": 25.0, "HL-Hit1": 50.0}  # (1+0+.5)/6
    assert metrics["brief"] == {
        "HL-min-Fair-mAP": 83.33,
        "HL-min-Fair-Hit1": 50.0,
        "HL-min-Good-mAP": 33.33,
        "HL-min-Good-Hit1": 50.0,
        "HL-min-VeryGood-mAP": 25.0,
        "HL-min-VeryGood-Hit1": 50.0,
    }
    assert "full" not in metrics  # no windows predicted: no moment retrieval


def test_short_saliency_is_zero_padded():
    # 4 clips, clip 2 rated [4,4,4]; pred [.5,-1] padded to [.5,-1,0,0] -> ranking .5 | 0,0 (tie) | -1
    # thresholds: .5 -> TP 0 of 1; 0 -> TP 1 of 3 (P 1/3, R 1); -1 -> TP 1 of 4 (P 1/4, R 1)
    # reversed + end: P [1/4,1/3,0,1], R [1,1,0,0]; running max [1/4,1/3,1/3,1]; step at 1 -> AP 1/3
    metrics = eval_qvhighlights(
        [{"qid": 1, "pred_saliency_scores": [0.5, -1.0]}], [_query(1, 8.0, [2], [[4, 4, 4]])]
    )
    assert metrics["HL-min-VeryGood"] == {"HL-mAP": 33.33, "HL-Hit1": 0.0}


def test_rating_matrix_and_errors():
    ratings = rating_matrix(_query(1, 9.0, [0, 3], [[1, 2, 3], [4, 4, 4]]))
    assert ratings.shape == (4, 3)  # int(9 / 2) clips
    assert ratings[3].tolist() == [4, 4, 4] and ratings[1].tolist() == [0, 0, 0]
    with pytest.raises(PredictionError, match="beyond"):
        rating_matrix(_query(1, 6.0, [3], [[1, 1, 1]]))
    gt = [_query(1, 8.0, [1], [[4, 4, 4]]), _query(2, 8.0, [1], [[4, 4, 4]])]
    preds = [
        {"qid": 1, "pred_relevant_windows": [[0, 2, 1]], "pred_saliency_scores": [1, 2, 3, 4]},
        {"qid": 2, "pred_relevant_windows": [[0, 2, 1]]},
    ]
    with pytest.raises(PredictionError, match="qid 2: no 'pred_saliency_scores'"):
        eval_qvhighlights(preds, gt)
