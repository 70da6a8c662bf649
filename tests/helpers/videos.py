"""Tiny synthetic videos (and broken files) for tests: a few frames at a small size, encoded in milliseconds.

Every frame shows the same asymmetric picture so orientation can be checked: a red top-left
quadrant, a green ramp from left to right, and a blue level that encodes the frame number.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def pattern(width: int, height: int, index: int) -> np.ndarray:
    """The test picture ``(height, width, 3)`` uint8 of frame ``index``."""
    img = np.zeros((height, width, 3), np.uint8)
    img[: height // 2, : width // 2, 0] = 255
    img[..., 1] = (np.arange(width) * 255 // max(width - 1, 1)).astype(np.uint8)[None]
    img[..., 2] = (index * 37) % 256
    return img


def make_video(
    path: str | Path,
    *,
    width: int = 64,
    height: int = 48,
    frames: int = 10,
    rate: int = 10,
    times: Sequence[float] | None = None,
    rotation: int | None = None,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    faststart: bool = False,
) -> Path:
    """Encode a small test video and return its path.

    Args:
        frames: number of frames (ignored when ``times`` is given).
        rate: nominal frame rate (frames per second).
        times: presentation times in seconds, for a variable-frame-rate video.
        rotation: display-matrix rotation in degrees counter-clockwise (phone videos).
        faststart: put the mp4 index first (then a truncated file still opens).
    """
    path = Path(path)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        if times is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        count = len(times) if times is not None else frames
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(pattern(width, height, i), format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def make_audio_only(path: str | Path, seconds: float = 0.5) -> Path:
    """An AAC audio-only ``.mp4`` file (no video stream)."""
    path = Path(path)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        for i in range(max(1, int(seconds * 8000 / 1024))):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def truncate(source: str | Path, path: str | Path, fraction: float = 0.5) -> Path:
    """Copy the first ``fraction`` of the bytes of ``source`` to ``path`` (a cut-off download)."""
    data = Path(source).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])
    return Path(path)
