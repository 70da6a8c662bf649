"""Frame sampling, resize/crop and CLIP normalisation (extract/frames.py)."""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from extract.config import sample_paths
from extract.frames import (
    CLIP_MEAN,
    CLIP_STD,
    _FilterChain,
    crop_offset,
    preprocess,
    probe,
    sample_frames,
    scaled_size,
)
from shards.errors import VideoError
from tests.helpers.videos import make_audio_only, make_video, truncate

DATA = Path(__file__).parent / "data"
CHARADES = sample_paths()[0] / "univtg_charades.mp4"


def _source_frames(path: Path, size: int = 224) -> tuple[list[float], list[np.ndarray]]:
    """Every decoded frame's time and its scaled + cropped RGB picture (no fps filter)."""
    times, pictures = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        chain = None
        for frame in container.decode(stream):
            chain = chain or _FilterChain(frame, stream.time_base, size, None, 0)
            times.append(float(frame.time))
            pictures.extend(chain.push(frame))
    return times, pictures


def _resize_crop(image: np.ndarray, size: int) -> np.ndarray:
    """One ``(H, W, 3)`` uint8 image through the video path's scale + crop filters: ``(size, size, 3)``."""
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    frame.pts = 0
    chain = _FilterChain(frame, Fraction(1, 1), size, None, 0)
    return [*chain.push(frame), *chain.push(None)][0]


@pytest.fixture(scope="module")
def charades_source() -> tuple[list[float], list[np.ndarray]]:
    return _source_frames(CHARADES)


@pytest.mark.parametrize(("fps", "count", "first"), [(0.5, 15, [14, 44, 74]), (1.0, 31, [7, 22, 37])])
def test_sampled_source_indices_match_reference(charades_source, fps, count, first) -> None:
    times, pictures = charades_source
    frames = list(sample_frames(CHARADES, fps))
    assert len(frames) == count
    # the reference rule: output n is the last source frame before the middle of clip n
    expected = [max(i for i, t in enumerate(times) if t < (n + 0.5) / fps) for n in range(count)]
    assert expected[:3] == first
    for n, frame in enumerate(frames):
        assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8
        assert np.array_equal(frame, pictures[expected[n]]), f"frame {n} is not source frame {expected[n]}"


@pytest.mark.parametrize("fps", ["0.5", "1.0"])
def test_frames_are_byte_identical_to_the_ffmpeg_command_line(fps) -> None:
    golden = json.loads((DATA / "ffmpeg_reference_frames.json").read_text())["frames"][fps]
    ours = [hashlib.sha256(f.tobytes()).hexdigest() for f in sample_frames(CHARADES, float(fps))]
    assert ours == golden["sha256"]


def test_reference_resize_rule() -> None:
    assert scaled_size(480, 270, 224) == (398, 224)
    assert scaled_size(270, 480, 224) == (224, 398)
    assert scaled_size(640, 272, 336) == (790, 336)
    assert crop_offset(398, 224, 224) == (87, 0)
    assert crop_offset(224, 398, 224) == (0, 87)


def test_variable_frame_rate(tmp_path) -> None:
    times = [0.0, 0.1, 0.15, 0.9, 1.0, 1.1, 2.5, 2.6, 2.65, 2.7, 4.0, 4.9]
    path = make_video(tmp_path / "vfr.mp4", times=times)
    frames = list(sample_frames(path, 2.0, size=32))
    assert len(frames) == 10  # 5 s at 2 fps
    # output n shows the last frame before (n + 0.5) / 2 s; the blue level encodes the frame index
    expected = [max(i for i, t in enumerate(times) if t < (n + 0.5) / 2.0) for n in range(10)]
    blue = [int(np.median(f[..., 2])) for f in frames]
    assert blue == pytest.approx([(i * 37) % 256 for i in expected], abs=6)


def test_rotation_metadata_is_applied(tmp_path) -> None:
    path = make_video(tmp_path / "rot.mp4", width=64, height=48, frames=3, rotation=90)
    info = probe(path)
    assert (info.width, info.height, info.rotation) == (48, 64, 90)
    frame = next(sample_frames(path, 10.0, size=48))  # portrait 48x64 -> 48x64, crop rows 8..56
    assert frame.shape == (48, 48, 3)
    # counter-clockwise by 90 degrees: the red top-left quadrant ends up bottom-left
    red = frame[..., 0] > 128
    assert red[-8:, :8].all() and not red[:8, :8].any() and not red[-8:, -8:].any()
    # and the green ramp that ran left->right now runs bottom->top
    assert frame[2, 24, 1] > frame[-3, 24, 1] + 100


@pytest.mark.parametrize(("width", "height", "pix_fmt"), [(64, 48, "yuv420p"), (63, 47, "yuv444p")])
def test_sizes_smaller_than_the_crop(tmp_path, width, height, pix_fmt) -> None:
    path = make_video(tmp_path / "small.mp4", width=width, height=height, frames=6, pix_fmt=pix_fmt)
    frames = list(sample_frames(path, 5.0))
    assert len(frames) == 3
    assert all(f.shape == (224, 224, 3) for f in frames)
    # the red quadrant (left half of the upscaled picture) survives the centre crop on the left
    assert frames[0][10, 5, 0] > 200 and frames[0][-10, 5, 0] < 60


def test_frames_are_streamed(tmp_path) -> None:
    path = make_video(tmp_path / "long.mp4", frames=40, rate=10)
    stream = sample_frames(path, 2.0, size=16)
    first = next(stream)  # available before the file is read to the end
    assert first.shape == (16, 16, 3)
    assert len(list(stream)) == 7


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: truncate(make_video(d / "a.mp4", frames=30), d / "cut.mp4"), "not a readable video"),
        (
            lambda d: truncate(make_video(d / "a.mp4", frames=60, faststart=True), d / "cut.mp4", 0.5),
            "truncated",
        ),
        (lambda d: _write(d / "notes.mp4", b"this is a text file\n" * 20), "not a readable"),
        (lambda d: _write(d / "empty.mp4", b""), "empty file"),
        (lambda d: make_audio_only(d / "speech.mp4"), "no video stream"),
        (lambda d: d / "absent.mp4", "missing file"),
    ],
    ids=["truncated", "truncated-faststart", "text-file", "zero-length", "audio-only", "missing"],
)
def test_broken_inputs_raise_video_error(tmp_path, make, reason) -> None:
    path = make(tmp_path)
    with pytest.raises(VideoError, match=reason) as info:
        list(sample_frames(path, 2.0, size=16))
    assert str(path) in str(info.value)


def test_normalisation_matches_open_clip_exactly() -> None:
    expected = np.load(DATA / "clip_preprocess" / "expected_preprocessed_image.npy")
    mean = np.array(CLIP_MEAN).reshape(1, 3, 1, 1)
    std = np.array(CLIP_STD).reshape(1, 3, 1, 1)
    levels = (expected * std + mean) * 255  # the uint8 picture open_clip normalised
    assert np.abs(levels - np.round(levels)).max() < 1e-3
    pixels = np.round(levels).astype(np.uint8).transpose(0, 2, 3, 1)
    ours = preprocess(pixels).numpy()
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == np.float32
    assert np.abs(ours - expected).max() < 1e-6


def test_resize_path_against_open_clip_golden_image() -> None:
    """swscale bicubic (the reference's ffmpeg scaler) vs. open_clip's PIL bicubic on a real photo.

    The two bicubic kernels differ slightly, so values differ by at most a few uint8 levels:
    max 0.06 in normalised units (4 levels), mean 0.0033; the crop offsets agree.
    """
    image = np.asarray(Image.open(DATA / "clip_preprocess" / "franz-kafka.jpg").convert("RGB"))
    expected = np.load(DATA / "clip_preprocess" / "expected_preprocessed_image.npy")
    ours = preprocess(_resize_crop(image, 224)[None]).numpy()
    diff = np.abs(ours - expected)
    assert diff.max() < 0.07
    assert diff.mean() < 0.005
    assert (diff < 2.5 / 255 / min(CLIP_STD)).mean() > 0.999
    # a one-pixel shift of the crop would be far worse than the kernel difference
    assert np.abs(ours[..., 1:] - expected[..., :-1]).mean() > 3 * diff.mean()


def test_preprocess_rejects_wrong_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((1, 8, 8, 3), np.float32))


def test_fps_graph_time_base_is_independent_of_container_offset(tmp_path) -> None:
    # a stream starting at 1.7 s is sampled from its own start, like `ffmpeg -i`
    times = [1.7 + 0.1 * i for i in range(12)]
    path = make_video(tmp_path / "offset.mp4", times=times)
    frames = list(sample_frames(path, 2.0, size=16))
    assert len(frames) == 2
    blue = [int(np.median(f[..., 2])) for f in frames]
    assert blue == pytest.approx([(2 * 37) % 256, (7 * 37) % 256], abs=6)
