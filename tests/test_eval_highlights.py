"""YouTube Highlights mAP and TVSum top-5 mAP on hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest

from eval.highlights import lower_median, ranked_average_precision, tvsum_top5_map, youtube_map
from eval.metrics import evaluate
from eval.predictions import PredictionError
from shards.schema import Query


def _video(qid: str, domain: str, saliency: dict) -> Query:
    return Query(vid=qid, qid=qid, text=domain, duration=10.0, split="val", saliency=saliency, domain=domain)


def test_ranked_average_precision_trapezoid():
    # ranked labels [1,0,1,1,0], 3 positives; AP = sum (rec_i - rec_{i-1}) (prec_{i-1} + prec_i) / 2
    #  i1: rec 1/3, prec 1   -> 1/3 * (1 + 1) / 2       = .333333
    #  i2: rec 1/3           -> 0
    #  i3: rec 2/3, prec 2/3 -> 1/3 * (1/2 + 2/3) / 2   = .194444
    #  i4: rec 1,   prec 3/4 -> 1/3 * (2/3 + 3/4) / 2   = .236111
    assert ranked_average_precision(np.array([1, 0, 1, 1, 0])) == pytest.approx(0.763889, abs=1e-6)
    # [0,0,1]: only i3 counts: 1 * (0 + 1/3) / 2 = 1/6
    assert ranked_average_precision(np.array([0, 0, 1])) == pytest.approx(1 / 6)
    assert ranked_average_precision(np.array([0, 0])) == 0.0


def test_youtube_map_hand_worked():
    gt = [
        # positives = match > 0 -> [1,0,0,1,1]; saliency ranks clips 0,1,3,4,2
        # -> labels [1,0,1,1,0] -> .763889
        _video("a", "dog", {"match": [1, -1, 0, 1, 1]}),
        # ranks clips 0,1,2 -> labels [0,0,1] -> 1/6
        _video("b", "dog", {"match": [0, 0, 1]}),
        # no positive -> 0
        _video("c", "surfing", {"match": [-1, -1]}),
    ]
    preds = [
        {"qid": "a", "pred_saliency_scores": [0.9, 0.8, 0.1, 0.7, 0.2]},
        {"qid": "b", "pred_saliency_scores": [0.3, 0.2, 0.1]},
        {"qid": "c", "pred_saliency_scores": [0.5, 0.4]},
    ]
    metrics = youtube_map(preds, gt, domains=("dog", "gymnastics", "surfing"))
    # dog: (.763889 + .166667) / 2 = .465278; surfing 0; mean (.465278 + 0) / 2 = .232639
    assert metrics["brief"] == {"dog-mAP": 46.53, "surfing-mAP": 0.0, "mAP": 23.26}
    assert metrics["domains"]["dog"] == {"mAP": 46.53, "videos": 2}
    assert evaluate("youtube", preds, gt)["brief"]["mAP"] == 23.26


def test_youtube_equal_scores_keep_clip_order():
    # all scores equal -> clips stay in order: labels [0,1] -> 1 * (0 + 1/2) / 2 = .25
    metrics = youtube_map(
        [{"qid": "a", "pred_saliency_scores": [0.5, 0.5]}], [_video("a", "dog", {"match": [0, 1]})]
    )
    assert metrics["brief"]["mAP"] == 25.0


def test_lower_median():
    assert lower_median(np.array([[1.0, 5.0], [2.0, 4.0], [3.0, 1.0], [4.0, 1.0]])).tolist() == [2.0, 1.0]


def test_tvsum_top5_map_hand_worked():
    # 6 clips, 2 annotators. prediction ranks clips 3(.9) 5(.8) 0(.6) 4(.3) 2(.2) | 1(.1) is cut (top 5).
    #  annotator 0 scores [1,2,3,4,5,5]: median (lower middle) 3 -> positives clips 3,4,5
    #    top-5 labels [1,1,0,1,0], 3 positives: 1/3*(1+1)/2 + 1/3*(1+1)/2 + 0 + 1/3*(2/3+3/4)/2 = .902778
    #  annotator 1 scores [5,4,1,1,2,3]: median 2 -> positives clips 0,1,5 (clip 1 is outside the top 5)
    #    top-5 labels [0,1,1,0,0], 2 positives counted: 0 + .5*(0+.5)/2 + .5*(.5+2/3)/2 = .416667
    #  video mAP = (.902778 + .416667) / 2 = .659722
    scores = [[1, 5], [2, 4], [3, 1], [4, 1], [5, 2], [5, 3]]
    gt = [
        _video("x", "BK", {"scores": scores}),
        _video("y", "GA", {"scores": [[3, 3]] * 6}),  # nobody above the median -> AP 0
    ]
    preds = [
        {"qid": "x", "pred_saliency_scores": [0.6, 0.1, 0.2, 0.9, 0.3, 0.8]},
        {"qid": "y", "pred_saliency_scores": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]},
    ]
    metrics = tvsum_top5_map(preds, gt, domains=("BK", "BT", "GA"))
    assert metrics["brief"] == {"BK-mAP": 65.97, "GA-mAP": 0.0, "mAP": 32.99}
    assert evaluate("tvsum", preds, gt)["brief"] == metrics["brief"]


def test_missing_saliency_or_domain():
    gt = [_video("a", "dog", {"match": [0, 1]})]
    with pytest.raises(PredictionError, match="no predicted saliency"):
        youtube_map([{"qid": "a", "pred_relevant_windows": [[0, 1, 1]]}], gt)
    gt[0].domain = None
    with pytest.raises(PredictionError, match="no domain"):
        youtube_map([{"qid": "a", "pred_saliency_scores": [1, 2]}], gt)
