"""Moment-retrieval metrics (Charades-STA / TACoS / Ego4D-NLQ / QVHighlights MR) on hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest

from eval.grounding import eval_grounding, spanned_iou, temporal_iou
from eval.metrics import evaluate
from eval.predictions import PredictionError
from shards.schema import Query


def _query(qid: int, moments: list[list[float]], duration: float = 60.0) -> Query:
    return Query(vid=f"v{qid}", qid=qid, text="q", duration=duration, split="test", moments=moments)


def _pred(qid: int, windows: list[list[float]]) -> dict:
    return {"qid": qid, "pred_relevant_windows": windows}


def test_iou_functions():
    # [0,10] vs [5,20]: inter 5, union 10 + 15 - 5 = 20 -> .25; vs [20,30]: 0; two empty windows: 0 (not NaN)
    iou = temporal_iou(np.array([[0.0, 10.0], [3.0, 3.0]]), np.array([[5.0, 20.0], [20.0, 30.0], [3.0, 3.0]]))
    assert iou.tolist() == [[0.25, 0.0, 0.0], [0.0, 0.0, 0.0]]
    # spanned: inter / (max end - min start): overlapping pairs equal the IoU, disjoint ones are 0
    assert spanned_iou(
        np.array([[0.0, 10.0], [0.0, 4.0]]), np.array([[5.0, 20.0], [6.0, 10.0]])
    ).tolist() == [
        0.25,
        0.0,
    ]


# Three queries (seconds):
#  Q1 GT [0,10]; preds [0,8,.9] [2,10,.8] [20,30,.1]
#  Q2 GT [10,20] [30,40]; preds [12,22,.7] [30,36,.6]
#  Q3 GT [5,7]; preds [8,12,.5] [4,7,.4]
CASE_GT = [_query(1, [[0, 10]]), _query(2, [[10, 20], [30, 40]]), _query(3, [[5, 7]])]
CASE_PREDS = [
    _pred(1, [[0, 8, 0.9], [2, 10, 0.8], [20, 30, 0.1]]),
    _pred(2, [[12, 22, 0.7], [30, 36, 0.6]]),
    _pred(3, [[8, 12, 0.5], [4, 7, 0.4]]),
]


def test_recall_and_miou_hand_worked():
    full = eval_grounding(CASE_PREDS, CASE_GT)["full"]
    # top-1 IoU: Q1 [0,8]~[0,10] 8/10 = .8; Q2 [12,22]~[10,20] 8/12 = .667; Q3 [8,12]~[5,7] = 0
    assert full["MR-R1"]["0.3"] == 66.67  # 2 of 3
    assert full["MR-R1"]["0.5"] == 66.67
    assert full["MR-R1"]["0.7"] == 33.33  # only Q1
    assert full["MR-R1"]["0.8"] == 33.33  # .8 >= .8
    assert full["MR-R1"]["0.85"] == 0.0
    assert full["MR-mIoU"] == 48.89  # (.8 + .6667 + 0) / 3
    # best of top-5: Q1 .8; Q2 max(.667, [30,36]~[30,40] .6) = .667; Q3 [4,7]~[5,7] 2/3
    assert full["MR-R5"]["0.3"] == 100.0
    assert full["MR-R5"]["0.65"] == 100.0
    assert full["MR-R5"]["0.7"] == 33.33


def test_map_hand_worked():
    # Per-query AP (windows sorted by score, greedy matching, VOC interpolation):
    #  Q1: [0,8] TP (IoU .8) locks the GT; [2,10] (IoU .8) finds it locked -> FP; [20,30] FP.
    #      recall [1,1,1] -> AP = 1 for thresholds <= .8, 0 above.
    #  Q2: IoU .667 and .6 with different GTs -> AP 1 for t <= .6; at .65 only the first:
    #      P [1,.5], R [.5,.5] -> AP = .5 * 1 = .5; 0 for t >= .7.
    #  Q3: [8,12] FP then [4,7] TP (2/3): P [0,.5], R [0,1] -> interpolated AP .5 for t <= .65, else 0.
    # mean per t: .5/.55/.6: (1+1+.5)/3 = 83.33; .65: (1+.5+.5)/3 = 66.67; .7/.75/.8: 1/3 = 33.33; .85+: 0
    # average over the 10 thresholds: (3 * 5/6 + 2/3 + 3 * 1/3) / 10 = 41.67
    metrics = eval_grounding(CASE_PREDS, CASE_GT)
    mean_ap = metrics["full"]["MR-mAP"]
    assert [
        mean_ap[k] for k in ("0.5", "0.55", "0.6", "0.65", "0.7", "0.75", "0.8", "0.85", "0.9", "0.95")
    ] == [
        83.33,
        83.33,
        83.33,
        66.67,
        33.33,
        33.33,
        33.33,
        0.0,
        0.0,
        0.0,
    ]
    assert mean_ap["average"] == 41.67
    assert metrics["brief"]["MR-full-mAP"] == 41.67
    assert metrics["brief"]["MR-full-mAP@0.75"] == 33.33
    assert metrics["brief"]["MR-full-R1@0.7"] == 33.33
    assert metrics["brief"]["MR-full-R5@0.5"] == 100.0


def test_top1_is_file_order_but_map_sorts_by_score():
    # first window [0,2] (score .1) has IoU .2 with [0,10]: R1@0.3 misses;
    # the mAP ranks [0,10] (score .9) first -> AP 1
    metrics = eval_grounding([_pred(1, [[0, 2, 0.1], [0, 10, 0.9]])], [_query(1, [[0, 10]])])
    assert metrics["full"]["MR-R1"]["0.3"] == 0.0
    assert metrics["full"]["MR-mIoU"] == 20.0
    assert metrics["full"]["MR-R5"]["0.95"] == 100.0
    assert metrics["full"]["MR-mAP"]["average"] == 100.0


def test_map_uses_only_the_first_ten_windows():
    windows = [[40, 50, 0.9]] * 10 + [[0, 10, 1.0]]  # the only match is the 11th window
    metrics = eval_grounding([_pred(1, windows)], [_query(1, [[0, 10]])])
    assert metrics["full"]["MR-mAP"]["average"] == 0.0


def test_length_buckets():
    # A: GT lengths 5 (short) and 20 (middle); B: GT length 50 (long)
    gt = [_query(1, [[0, 5], [20, 40]]), _query(2, [[0, 50]])]
    preds = [_pred(1, [[0, 5, 0.9]]), _pred(2, [[0, 50, 1.0]])]
    metrics = eval_grounding(preds, gt)
    assert metrics["short"]["MR-R1"]["0.5"] == 100.0  # A vs [0,5] only
    assert metrics["middle"]["MR-R1"]["0.5"] == 0.0  # A vs [20,40] only
    assert metrics["long"]["MR-R1"]["0.5"] == 100.0  # B only
    # full: A recalls 1 of 2 GT -> AP .5; B AP 1 -> 75
    assert metrics["full"]["MR-mAP"]["average"] == 75.0
    assert metrics["brief"]["MR-short-mAP"] == 100.0
    assert metrics["brief"]["MR-middle-mAP"] == 0.0


def test_empty_bucket_is_left_out():
    metrics = eval_grounding([_pred(1, [[0, 5, 0.9]])], [_query(1, [[0, 5]])])
    assert set(metrics) == {"brief", "full", "short"}
    assert "MR-long-mAP" not in metrics["brief"] and "MR-short-mAP" in metrics["brief"]


def test_errors_and_dispatch():
    with pytest.raises(PredictionError, match="qid 1: no predicted windows"):
        eval_grounding([{"qid": 1, "pred_relevant_windows": []}], [_query(1, [[0, 5]])])
    with pytest.raises(PredictionError, match="no ground-truth windows"):
        eval_grounding([_pred(1, [[0, 5, 1.0]])], [_query(1, [])])
    brief = evaluate("charades-sta", CASE_PREDS, CASE_GT)["brief"]
    assert (brief["MR-full-R1@0.5"], brief["MR-full-mAP"]) == (66.67, 41.67)
