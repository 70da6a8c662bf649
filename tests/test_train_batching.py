"""Training targets and model inputs built from hand-made Query records (R2_SPEC §1 rules)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shards.datasets import get_dataset
from shards.errors import AnnotationError
from shards.schema import Query
from train.data.assembly import Batch
from train.data.batching import collate_targets, model_inputs, per_query_targets
from train.data.targets import clamp_boundary, query_targets, sample_positive


def _query(**kw) -> Query:
    base = dict(vid="v", qid=1, text="t", duration=20.0, split="train")
    base.update(kw)
    return Query(**base)


def test_boundary_clamp_swap_and_min_window():
    # 10 clips at 0.5 fps: the stored length (20 s) wins over the annotated duration (100 s).
    moments = [[-1, 5], [30, 10], [7, 7.5], [50, 60], [0, 0.4]]
    out = clamp_boundary(moments, num_clips=10, fps=0.5)
    expected = [
        [0, 5],  # clamped at 0
        [10, 20],  # clamped to [20, 10], then swapped
        [6.25, 8.25],  # shorter than one clip (2 s): 2-s window at the old centre 7.25
        [18, 20],  # empty at the end: centre 20 clamped to 20 - 1
        [0, 2],  # centre 0.2 clamped to 0.5 clip = 1 s
    ]
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.dtype == np.float32


def test_query_targets_use_stored_length_not_duration():
    t = query_targets(_query(duration=100.0, moments=[[10, 90]]), 10, 0.5, get_dataset("tacos"))
    np.testing.assert_allclose(t.boundary, [[10, 20]])
    assert t.num_clips == 10 and len(t.saliency) == 10


def test_binary_saliency_uses_ceil_of_clip_positions():
    q = _query(moments=[[2.5, 5.0], [7.2, 7.9]])
    t = query_targets(q, 10, 1.0, get_dataset("charades"))
    # [2.5, 5.0] -> clips ceil(2.5)=3 .. ceil(5)-1=4
    # [7.2, 7.9] is shorter than 1 s -> [7.05, 8.05] -> clip 8 only
    expected = np.zeros(10, np.float32)
    expected[[3, 4, 8]] = 1
    np.testing.assert_array_equal(t.saliency, expected)
    np.testing.assert_array_equal(t.positives, [3, 4, 8])


def test_qvhighlights_saliency_sum_over_12_truncated_to_stored_clips():
    q = _query(
        duration=150.0,
        moments=[[20, 30]],
        saliency={"clip_ids": [0, 10, 74], "scores": [[1, 0, 0], [4, 3, 2], [4, 4, 4]]},
    )
    t = query_targets(q, 74, 0.5, get_dataset("qvhighlights"))  # 75 annotated clips, 74 stored
    assert len(t.saliency) == 74
    assert t.saliency[0] == pytest.approx(1 / 12)
    assert t.saliency[10] == pytest.approx(9 / 12)
    assert np.count_nonzero(t.saliency) == 2  # clip 74 is cut off
    np.testing.assert_array_equal(t.positives, [0, 10])


def test_tvsum_saliency_and_above_median_positives():
    # per-clip sums over 20 annotators: 20, 40, 60, 100 -> (sum - 20) / 80 = 0, .25, .5, 1
    rows = [[1] * 20, [2] * 20, [3] * 20, [5] * 20]
    q = _query(saliency={"scores": rows}, domain="BK")
    spec = get_dataset("tvsum")
    t = query_targets(q, 5, 0.5, spec)  # 5 stored clips, 4 annotated: cut to 4
    np.testing.assert_allclose(t.saliency, [0, 0.25, 0.5, 1.0])
    assert t.num_clips == 4 and t.boundary.shape == (0, 2)
    np.testing.assert_array_equal(t.positives, [2, 3])  # torch's lower median of 4 values = .25
    t3 = query_targets(q, 3, 0.5, spec)
    np.testing.assert_array_equal(t3.positives, [2])  # median of [0, .25, .5] = .25


def test_youtube_saliency_and_positives():
    q = _query(saliency={"match": [-1, 0, 1, 1]}, domain="dog", fps=1.0)
    t = query_targets(q, 4, 1.0, get_dataset("youtube"))
    np.testing.assert_allclose(t.saliency, [0, 0.5, 1, 1])
    np.testing.assert_array_equal(t.positives, [2, 3])


def test_highlight_set_without_labels_is_an_annotation_error():
    with pytest.raises(AnnotationError, match="no saliency 'match'"):
        query_targets(_query(), 4, 1.0, get_dataset("youtube"))


def test_sample_positive_is_seeded_and_covers_the_positives():
    positives = np.array([3, 4, 8])
    draws = [sample_positive(positives, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    g = torch.Generator().manual_seed(0)
    seen = {sample_positive(positives, g) for _ in range(60)}
    assert seen == {3, 4, 8}


def test_collate_pads_boundary_with_inf_and_saliency_with_zero():
    spec = get_dataset("charades")
    a = query_targets(_query(moments=[[1, 3]]), 6, 1.0, spec)
    b = query_targets(_query(moments=[[0, 2], [4, 6]]), 8, 1.0, spec)
    saliency, pos, boundary = collate_targets([a, b], 8, torch.Generator().manual_seed(0))
    assert saliency.shape == (2, 8) and boundary.shape == (2, 2, 2)
    assert torch.isinf(boundary[0, 1]).all() and torch.isfinite(boundary[1]).all()
    assert saliency[0, 6:].eq(0).all()
    assert saliency[0, pos[0]] > 0 and saliency[1, pos[1]] > 0
    empty = query_targets(_query(moments=[]), 6, 1.0, spec)
    with pytest.raises(ValueError, match="no positive clip"):
        collate_targets([a, empty], 8, torch.Generator())


def _batch(queries: list[Query], lengths: list[int], index: list[int], fps: float) -> Batch:
    frames = max(lengths)
    video = torch.zeros(len(lengths), frames, 3, 2, 4, dtype=torch.float16)
    mask = torch.zeros(len(lengths), frames, dtype=torch.bool)
    for v, n in enumerate(lengths):
        video[v, :n] = torch.arange(1, n + 1, dtype=torch.float16)[:, None, None, None] + 100 * v
        mask[v, :n] = True
    return Batch(
        video=video,
        video_mask=mask,
        video_index=torch.tensor(index),
        query=torch.ones(len(queries), 5, 3, 6, dtype=torch.float16),
        query_mask=torch.ones(len(queries), 5, dtype=torch.bool),
        fps=torch.full((len(lengths),), fps),
        queries=queries,
        vids=[f"v{i}" for i in range(len(lengths))],
    )


def test_model_inputs_expand_videos_per_query_and_keep_last_layers():
    queries = [_query(qid=i, moments=[[0, 4]]) for i in range(3)]
    batch = _batch(queries, lengths=[6, 4], index=[1, 0, 1], fps=1.0)
    cpu, gen = torch.device("cpu"), torch.Generator().manual_seed(1)
    inputs = model_inputs(batch, get_dataset("charades"), 2, cpu, gen)
    assert inputs.video.shape == (3, 6, 2, 2, 4) and inputs.video.dtype == torch.float32
    assert inputs.query.shape == (3, 5, 2, 6)
    torch.testing.assert_close(inputs.video[0], inputs.video[2])
    torch.testing.assert_close(inputs.video[1], batch.video[0, :, 1:].float())
    assert inputs.video_mask.sum(dim=1).tolist() == [4, 6, 4]
    assert inputs.targets is not None and inputs.targets.boundary.shape == (3, 1, 2)
    assert inputs.targets.fps.tolist() == [1.0, 1.0, 1.0]
    assert model_inputs(batch, get_dataset("charades"), 2, cpu).targets is None


def test_model_inputs_cut_highlight_videos_to_annotated_clips():
    q = _query(saliency={"match": [1, -1, 1]}, domain="dog")
    batch = _batch([q], lengths=[5], index=[0], fps=1.0)
    cpu, gen = torch.device("cpu"), torch.Generator().manual_seed(0)
    inputs = model_inputs(batch, get_dataset("youtube"), 3, cpu, gen)
    assert inputs.video_mask[0].tolist() == [True, True, True, False, False]
    assert inputs.video[0, 3:].abs().sum() == 0 and inputs.video[0, :3].abs().sum() > 0
    assert inputs.targets.boundary is None
    assert inputs.targets.saliency[0].tolist() == [1, 0, 1, 0, 0]
    assert inputs.targets.pos_clip[0].item() in (0, 2)


def test_per_query_targets_follow_each_video_length_and_fps():
    queries = [_query(qid=0, moments=[[0, 100]]), _query(qid=1, moments=[[0, 100]])]
    batch = _batch(queries, lengths=[6, 3], index=[0, 1], fps=0.5)
    a, b = per_query_targets(batch, get_dataset("tacos"))
    assert math.isclose(float(a.boundary[0, 1]), 12.0) and math.isclose(float(b.boundary[0, 1]), 6.0)


def test_grouped_validation_equals_one_query_at_a_time():
    from eval.postprocess import postprocess_for
    from tests.helpers.synthetic import SyntheticSpec, synthetic_run_config
    from train.engine.evaluate import predict_batch
    from train.model import R2Tuning, decode_sample

    spec = SyntheticSpec(n_videos=1, layers=3, tokens=2, width=4, text_width=6, backbone="synthetic-batching")
    cfg = synthetic_run_config(spec, "tacos", ["model.dims=16", "model.heads=2"])
    torch.manual_seed(0)
    model = R2Tuning(cfg.model, cfg.loss).eval()
    queries = [_query(qid=i, vid=f"v{r}", duration=d) for i, (r, d) in enumerate([(0, 10), (1, 7), (0, 10)])]
    batch = _batch(queries, lengths=[10, 7], index=[0, 1, 0], fps=1.0)
    batch.video = torch.randn(batch.video.shape).half() * batch.video_mask[:, :, None, None, None]
    batch.query = torch.randn(batch.query.shape).half()
    batch.query_mask[1, 3:] = False  # query 1 has 3 tokens, the others 5
    preds = predict_batch(model, batch, get_dataset("tacos"), cfg, torch.device("cpu"))
    assert [p.qid for p in preds] == [0, 1, 2]
    for i, pred in enumerate(preds):
        row, length = int(batch.video_index[i]), int(batch.query_mask[i].sum())
        frames = int(batch.video_mask[row].sum())
        with torch.no_grad():
            out = model(
                batch.video[row : row + 1, :frames].float(),
                torch.ones(1, frames, dtype=torch.bool),
                batch.query[i : i + 1, :length].float(),
                torch.ones(1, length, dtype=torch.bool),
            )
        windows, saliency = decode_sample(out, 0, 1.0)
        expected = postprocess_for("tacos", windows.numpy(), queries[i].duration)
        np.testing.assert_allclose(pred.windows, expected, atol=1e-5)
        np.testing.assert_allclose(pred.saliency, saliency.numpy(), atol=1e-6)
        assert len(pred.saliency) == frames
