"""Reference post-processing: clamp + round rule, NMS modes, parity with the official outputs, and
validation applying the one entry (``postprocess_for``) with the registry's settings."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.postprocess import clamp_and_round, nms, postprocess_for
from shards.datasets import DatasetSpec, get_dataset
from shards.errors import ConfigError
from tests.helpers.synthetic import SyntheticSpec, make_synthetic_store, synthetic_run_config
from train.config import RunConfig
from train.engine.evaluate import predict_batch, validation_loader
from train.model import R2Tuning

PARITY = Path(__file__).parent / "data" / "r2_parity" / "outputs.npz"


@pytest.mark.parametrize(("sample", "clips"), [("A", 32), ("B", 75)])
@pytest.mark.parametrize("mode", ["normal", "linear"])
def test_matches_official_postprocessing(sample, clips, mode):
    outputs = np.load(PARITY)
    raw = outputs[f"{sample}_boundary"]  # (50, 3) float32, before clamp / round / NMS
    duration = clips / 0.5  # T / fps
    spec = replace(get_dataset("qvhighlights"), nms_mode=mode)  # unit 2, threshold 0.7
    ours = postprocess_for(spec, raw, duration)
    np.testing.assert_allclose(ours, outputs[f"{sample}_pred_nms_{mode}"], rtol=0, atol=1e-4)
    assert ours.dtype == np.float32 and ours.shape == raw.shape  # rows never dropped


def test_dataset_settings_follow_the_reference():
    outputs = np.load(PARITY)
    ours = postprocess_for("qvhighlights", outputs["B_boundary"], 150.0)  # unit 2, normal NMS 0.7
    np.testing.assert_allclose(ours, outputs["B_pred_nms_normal"], rtol=0, atol=1e-4)
    windows = np.array([[0.04, 3.06, 0.9], [0.0, 3.0, 0.8]])
    # charades: unit 0.1 -> [0, 3.1]; linear NMS: IoU([0,3.1],[0,3]) = 3/3.1 -> .8 * (1 - 3/3.1)
    ours = postprocess_for("charades", windows, 30.0)
    np.testing.assert_allclose(ours, [[0.0, 3.1, 0.9], [0.0, 3.0, 0.8 * (1 - 3 / 3.1)]], atol=1e-9)


def test_clamp_and_round_only_rows_ending_inside():
    windows = np.array(
        [
            [-1.2, 5.3, 0.9],  # end < 30: clamp start to 0, round 5.3 / 2 = 2.65 -> 3 -> 6
            [3.1, 40.0, 0.8],  # end >= 30 before clamping: clamped to [3.1, 30], not rounded
            [10.9, 30.0, 0.7],  # end == duration: not rounded
            [1.0, 3.0, 0.6],  # halves round to even: .5 -> 0, 1.5 -> 2
        ]
    )
    out = clamp_and_round(windows, 30.0, 2.0)
    assert out.tolist() == [[0.0, 6.0, 0.9], [3.1, 30.0, 0.8], [10.9, 30.0, 0.7], [0.0, 4.0, 0.6]]
    assert clamp_and_round(windows, 30.0, None)[0].tolist() == [0.0, 5.3, 0.9]
    assert windows[0, 0] == -1.2  # input untouched


WINDOWS = np.array([[0, 10, 0.9], [1, 10, 0.8], [20, 30, 0.7], [0, 9, 0.95]], dtype=np.float64)


def test_nms_normal():
    # step 0 takes [0,9,.95]: IoU with [1,10] = 8/10, with [0,10] = 9/10 (>= .7 -> 0), with [20,30] = 0
    # step 1 takes [20,30,.7]; the two zeroed rows follow in their current order
    out = nms(WINDOWS, "normal", thres=0.7)
    assert out.tolist() == [[0, 9, 0.95], [20, 30, 0.7], [1, 10, 0.0], [0, 10, 0.0]]


def test_nms_linear():
    # step 0 ([0,9]): [1,10] .8 * (1 - .8) = .16, [0,10] .9 * (1 - .9) = .09, [20,30] unchanged
    # step 1 ([20,30]): no overlap; step 2 ([1,10] .16): [0,10] IoU .9 -> .09 * .1 = .009
    out = nms(WINDOWS, "linear")
    np.testing.assert_allclose(out, [[0, 9, 0.95], [20, 30, 0.7], [1, 10, 0.16], [0, 10, 0.009]], atol=1e-12)


def test_nms_gaussian():
    # score *= exp(-IoU^2 / sigma), sigma .5: [1,10] .8 * exp(-.64 / .5); [0,10] .9 * exp(-.81 / .5) twice
    out = nms(WINDOWS, "gaussian", sigma=0.5)
    first = 0.8 * math.exp(-0.64 / 0.5)
    second = 0.9 * math.exp(-0.81 / 0.5) * math.exp(-0.81 / 0.5)
    np.testing.assert_allclose(out[:, 2], [0.95, 0.7, first, second], atol=1e-12)
    assert out[2, :2].tolist() == [1, 10] and out[3, :2].tolist() == [0, 10]


def test_nms_edge_cases():
    assert nms(np.zeros((0, 3))).shape == (0, 3)
    with pytest.raises(ConfigError, match="unknown NMS mode 'soft'"):
        nms(WINDOWS, "soft")
    # highlight-only datasets: no NMS, no rounding, rows keep their order
    assert postprocess_for("tvsum", WINDOWS, 30.0).tolist() == WINDOWS.tolist()


def test_a_threshold_of_zero_is_zero_and_none_is_the_default():
    apart = np.array([[0.0, 10.0, 0.9], [20.0, 30.0, 0.8]])  # IoU 0: >= 0 but not >= 0.7
    qvh = replace(get_dataset("qvhighlights"), clip_unit=None)
    assert postprocess_for(replace(qvh, nms_thres=0.0), apart, 30.0)[:, 2].tolist() == [0.9, 0.0]
    assert postprocess_for(replace(qvh, nms_thres=None), apart, 30.0)[:, 2].tolist() == [0.9, 0.8]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, RunConfig, R2Tuning]:
    """A tiny QVHighlights-like store (2 videos of 16 clips, 2 queries each), its config, a model."""
    spec = SyntheticSpec(n_videos=2, clips=16, dataset="qvhighlights", backbone="synthetic-postprocess")
    path = tmp_path_factory.mktemp("pp") / "s.zarr"
    make_synthetic_store(path, spec)
    cfg = synthetic_run_config(spec, "qvhighlights", ["model.dims=16", "model.heads=2", "batch_size=4"])
    torch.manual_seed(0)
    return path, cfg, R2Tuning(cfg.model, cfg.loss).eval()


def _validation_windows(synthetic, spec: DatasetSpec) -> tuple[list[np.ndarray], list[float]]:
    """Windows ``predict_batch`` gives for every query of the synthetic store under ``spec``, and the
    queries' durations."""
    path, cfg, model = synthetic
    windows, durations = [], []
    for batch in validation_loader(path, cfg, "train"):
        for pred, query in zip(predict_batch(model, batch, spec, cfg, torch.device("cpu")), batch.queries,
                               strict=True):
            windows.append(pred.windows)
            durations.append(query.duration)
    return windows, durations


@pytest.mark.parametrize("thres", [0.7, 0.0])
def test_validation_applies_postprocess_for_with_the_spec(synthetic, thres):
    spec = replace(get_dataset("qvhighlights"), nms_thres=thres)
    # clamping is idempotent under postprocess_for: clamp-only windows stand for the raw output
    clamped, durations = _validation_windows(synthetic, replace(spec, clip_unit=None, nms_mode=None))
    processed, _ = _validation_windows(synthetic, spec)
    assert len(processed) == 4 and all(len(w) == 16 + 8 + 4 + 2 for w in processed)  # strides 1, 2, 4, 8
    for raw, ours, duration in zip(clamped, processed, durations, strict=True):
        np.testing.assert_array_equal(ours, postprocess_for(spec, raw, duration))
        assert (ours[1:, 2] == 0).all() == (thres == 0.0)  # 0: every later row is suppressed
