"""Frame sampling, resize (each backbone's resize mode; the reference's crop byte for byte) and
normalisation (extract/frames.py)."""

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
    _FilterChain,
    crop_offset,
    kept_ratio_size,
    preprocess,
    preprocess_spec,
    probe,
    sample_frames,
    scaled_size,
)
from shards.backbones import OPENAI_MEAN, OPENAI_STD, Preprocess
from shards.errors import ConfigError, VideoError
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
            chain = chain or _FilterChain(frame, stream.time_base, preprocess_spec(size), None, 0)
            times.append(float(frame.time))
            pictures.extend(chain.push(frame))
    return times, pictures


def _resize_crop(image: np.ndarray, size: int) -> np.ndarray:
    """One ``(H, W, 3)`` uint8 image through the video path's scale + crop filters: ``(size, size, 3)``."""
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    frame.pts = 0
    chain = _FilterChain(frame, Fraction(1, 1), preprocess_spec(size), None, 0)
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
    mean = np.array(OPENAI_MEAN).reshape(1, 3, 1, 1)
    std = np.array(OPENAI_STD).reshape(1, 3, 1, 1)
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
    assert (diff < 2.5 / 255 / min(OPENAI_STD)).mean() > 0.999
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


def _bordered_video(path: Path, width: int = 96, height: int = 48) -> Path:
    """A video whose picture has a red left band, a blue right band (16 px each) and grey between."""
    picture = np.full((height, width, 3), 128, np.uint8)
    picture[:, :16] = (255, 0, 0)
    picture[:, -16:] = (0, 0, 255)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        for _ in range(5):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    return path


def _spec(mode: str, size: int = 32, interpolation: str = "bicubic", fill: int = 0) -> Preprocess:
    return Preprocess(size, mode, interpolation, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), fill)


def test_squash_keeps_the_whole_picture(tmp_path) -> None:
    path = _bordered_video(tmp_path / "bands.mp4")
    squashed = next(sample_frames(path, 2.0, _spec("squash")))
    assert squashed.shape == (32, 32, 3)
    # 96x48 -> 32x32: both 16-px bands survive as ~5-px bands on their own side, nothing is cut
    assert (squashed[:, :4, 0] > 200).all() and (squashed[:, :4, 2] < 60).all()
    assert (squashed[:, -4:, 2] > 200).all() and (squashed[:, -4:, 0] < 60).all()
    assert np.abs(squashed[:, 8:24].astype(int) - 128).max() < 12
    # the reference's short side + centre crop of the same video cuts the bands away (64x32 -> x 16..48)
    cropped = next(sample_frames(path, 2.0, 32))
    assert (cropped[..., 0] < 200).all() and (cropped[..., 2] < 200).all()


def test_longest_pads_with_the_fill_colour(tmp_path) -> None:
    path = _bordered_video(tmp_path / "bands.mp4")
    assert kept_ratio_size(96, 48, 32) == (32, 16) and kept_ratio_size(48, 97, 32) == (16, 32)
    padded = next(sample_frames(path, 2.0, _spec("longest", fill=200)))
    assert padded.shape == (32, 32, 3)
    # 96x48 -> 32x16 centred: rows 0..7 and 24..31 are the fill, the picture in between has both bands
    assert (padded[:8] == 200).all() and (padded[24:] == 200).all()
    assert padded[16, 1, 0] > 200 and padded[16, -2, 2] > 200 and abs(int(padded[16, 16, 1]) - 128) < 12


def test_the_interpolation_of_the_spec_is_used(tmp_path) -> None:
    path = make_video(tmp_path / "ramp.mp4", width=64, height=48, frames=4)
    frames = {k: next(sample_frames(path, 5.0, _spec("squash", 40, k))) for k in ("bicubic", "bilinear")}
    assert not np.array_equal(frames["bicubic"], frames["bilinear"])
    assert np.abs(frames["bicubic"].astype(int) - frames["bilinear"].astype(int)).mean() < 4


def test_the_reference_spec_gives_the_reference_frames() -> None:
    spec = preprocess_spec(224)
    assert (spec.resize_mode, spec.interpolation, spec.mean, spec.std) == (
        "shortest", "bicubic", OPENAI_MEAN, OPENAI_STD,
    )  # fmt: skip
    by_side = [f.tobytes() for f in sample_frames(CHARADES, 0.25)]
    assert by_side == [f.tobytes() for f in sample_frames(CHARADES, 0.25, spec)]


def test_preprocess_normalises_with_the_specs_mean_and_std() -> None:
    frames = np.array([[[[0, 128, 255]]]], np.uint8)
    siglip = preprocess(frames, spec=_spec("squash", 1)).numpy().ravel()
    np.testing.assert_allclose(siglip, [-1.0, 128 / 127.5 - 1, 1.0], atol=1e-6)
    openai = preprocess(frames).numpy().ravel()
    np.testing.assert_allclose(openai, (np.array([0, 128, 255]) / 255 - OPENAI_MEAN) / OPENAI_STD, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"resize_mode": "crop"}, "resize mode 'crop'"),
        ({"interpolation": "random"}, "interpolation 'random'"),
        ({"mean": [0.5, 0.5]}, "three means"),
        ({"std": None}, "malformed"),
    ],
)
def test_a_spec_the_frame_path_cannot_follow_is_refused(change, message) -> None:
    record = {**_spec("squash").record(), **change}
    with pytest.raises(ConfigError, match=message):
        preprocess_spec(224, record)
