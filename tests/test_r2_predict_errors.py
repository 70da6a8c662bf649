"""``r2 predict`` refuses bad input with one ``error:`` line and exit status 2, never a traceback.

Covers the rate (``--fps`` on fixed-rate and per-video-rate checkpoints, the clip cap), videos that
give no clip (1 frame), a folder as the video, empty sentences and a negative ``--top``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import r2.predict
from extract.backbone import load_backbone
from r2.cli import build_app
from r2.predict import MAX_CLIPS, Predictor
from shards.errors import ConfigError
from tests.helpers.videos import make_video
from train.checkpoint import save_checkpoint
from train.config import get_preset
from train.model import R2Tuning


def _checkpoint(path: Path, fps: object) -> Path:
    """A tiny checkpoint of random weights whose store was sampled at ``fps`` (``None`` = per video)."""
    info = load_backbone("ViT-B-32", "random:0", layers=4, device="cpu").info()
    cfg = get_preset("charades")
    torch.manual_seed(0)
    store = {
        "backbone": info.name,
        "pretrained": info.pretrained,
        "weights_sha256": info.weights_sha256,
        "fps": fps,
        "layers": info.layers,
        "dataset": "charades",
    }
    return save_checkpoint(path, R2Tuning(cfg.model, cfg.loss), cfg, {"store": store})


@pytest.fixture(scope="module")
def fixed(tmp_path_factory) -> Path:
    """Checkpoint of a store sampled at 1 fps."""
    return _checkpoint(tmp_path_factory.mktemp("fixed") / "best.pt", 1.0)


@pytest.fixture(scope="module")
def per_video(tmp_path_factory) -> Path:
    """Checkpoint of a store sampled at a per-video rate (YouTube Highlights style)."""
    return _checkpoint(tmp_path_factory.mktemp("per_video") / "best.pt", None)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """A 4 s video at 10 frames per second."""
    return make_video(tmp_path_factory.mktemp("video") / "four.mp4", frames=40, rate=10)


def _predict(*args: str) -> str:
    """Run ``r2 predict ARGS --device cpu``; assert exit status 2 and one ``error:`` line; return it."""
    result = CliRunner().invoke(build_app(), ["predict", *args, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("fps", ["-1", "nan", "0", "inf"])
def test_a_bad_fps_is_refused_for_a_fixed_rate_checkpoint(fixed, video, fps) -> None:
    assert "--fps must be a finite number of clips per second above 0" in _predict(
        str(video), "a man", "-c", str(fixed), "--fps", fps
    )


@pytest.mark.parametrize("fps", ["-1", "nan", "0", "inf", "-inf"])
def test_a_bad_fps_is_refused_for_a_per_video_rate_checkpoint(per_video, video, fps) -> None:
    assert "--fps must be a finite number of clips per second above 0" in _predict(
        str(video), "a man", "-c", str(per_video), "--fps", fps
    )


@pytest.mark.parametrize("stored", [0, -1.0, "1"])
def test_a_checkpoint_recording_a_bad_rate_is_refused(tmp_path, video, stored) -> None:
    bad = _checkpoint(tmp_path / "bad.pt", stored)
    line = _predict(str(video), "a man", "-c", str(bad))
    assert f"records a store rate of {stored!r}, not a positive number" in line


def test_another_fps_than_a_fixed_rate_checkpoints_is_refused(fixed, video) -> None:
    line = _predict(str(video), "a man", "-c", str(fixed), "--fps", "2")
    assert "sampled at 1 fps" in line and "leave --fps out" in line


def test_the_fixed_rate_itself_is_accepted(fixed) -> None:
    assert Predictor.from_checkpoint(fixed, device="cpu", fps=1.0).fps == 1.0
    with pytest.raises(ConfigError, match="sampled at 1 fps"):
        Predictor.from_checkpoint(fixed, device="cpu", fps=0.5)


def test_a_rate_giving_no_clip_is_refused(per_video, video) -> None:
    line = _predict(str(video), "a man", "-c", str(per_video), "--fps", "1e-9")
    assert "no frames could be sampled at 1e-09 fps" in line


def test_a_one_frame_video_is_refused_like_extract_does(fixed, tmp_path) -> None:
    one = make_video(tmp_path / "one.mp4", frames=1)
    line = _predict(str(one), "a man", "-c", str(fixed))
    assert f"{one}: no frames could be sampled at 1 fps" in line


def test_a_rate_above_the_videos_frame_rate_is_refused(per_video, video) -> None:
    line = _predict(str(video), "a man", "-c", str(per_video), "--fps", "1000")
    assert "above the 10 fps frame rate" in line and "at most 10" in line


def test_more_clips_than_the_cap_are_refused(per_video, video, monkeypatch) -> None:
    monkeypatch.setattr(r2.predict, "MAX_CLIPS", 16)
    line = _predict(str(video), "a man", "-c", str(per_video), "--fps", "5")
    assert "20 clips" in line and "more than the 16" in line and "--fps of at most 4" in line


def test_the_cap_holds_a_long_film_at_one_clip_per_second() -> None:
    assert MAX_CLIPS >= 2 * 3600 and MAX_CLIPS % r2.predict.DEFAULT_WINDOW == 0


def test_a_folder_is_refused_as_the_video(fixed, tmp_path) -> None:
    assert "is a folder, not a video file" in _predict(str(tmp_path), "a man", "-c", str(fixed))


@pytest.mark.parametrize("sentence", ["", "   "])
def test_an_empty_sentence_is_refused(fixed, video, sentence) -> None:
    line = _predict(str(video), "a man", sentence, "-c", str(fixed))
    assert "sentence 2 is empty" in line


def test_a_negative_top_is_refused(fixed, video) -> None:
    assert "--top must be at least 1" in _predict(str(video), "a man", "-c", str(fixed), "--top", "-1")
