"""Decode a video with PyAV and sample frames ready for a backbone's image tower, in-process.

How a frame is resized follows the backbone's :class:`~shards.backbones.Preprocess` (open_clip's
config for the model, recorded in a store's manifest):

* ``shortest`` (OpenAI CLIP, EVA-02, ...): the R²-Tuning reference's graph. The reference runs the
  ffmpeg command line with the filter chain ``fps=<rate>,scale=<w'>:<h'>,crop=<size>:<size>:<x>:<y>``
  and reads ``rgb24`` frames. We run the *same* libavfilter graph inside PyAV, so the sampled
  instants (``fps`` filter, rounding "near": output frame ``n`` is the last input frame before
  ``(n + 0.5) / fps`` seconds), the bicubic swscale resize and the crop offsets (rounded down to
  even numbers in ``yuv420p``, as ffmpeg does) are byte-identical to the reference frames, without
  writing anything to disk;
* ``squash`` (SigLIP, SigLIP 2): both sides scaled to ``size``, nothing cropped (aspect not kept);
* ``longest``: the long side scaled to ``size`` (the short one to ``round(short * size / long)``, as
  open_clip's ``ResizeKeepRatio``), then centred on a ``size`` x ``size`` canvas of the fill colour.

The swscale kernel is the spec's ``interpolation`` (:data:`SCALE_FLAGS`); the sampled instants are
the same in every mode.

Like the ffmpeg command line we

* shift timestamps by the container's start time (so the output grid starts at 0 s);
* rotate frames that carry a display matrix (``transpose`` / ``hflip,vflip``, as players do).
  Unlike the reference, which computes the target size from the *coded* width and height, we
  compute it from the *displayed* (rotated) size, so portrait phone videos keep their aspect.

Frames are streamed: only the current frame and the filter's small state are in memory.
Importing this module does not import torch (only :func:`preprocess` needs it), so the cheap
readers (:func:`video_duration`, :func:`probe`) serve before the model is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np

from shards.backbones import OPENAI_MEAN, OPENAI_STD, REFERENCE_PREPROCESS, Preprocess
from shards.errors import ConfigError, VideoError

if TYPE_CHECKING:
    import torch

TRUNCATION_TOLERANCE = 2.0
"""Seconds of declared video that may be missing at the end before a file counts as truncated."""
SCALE_FLAGS = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "neighbor", "lanczos": "lanczos"}
"""A :class:`~shards.backbones.Preprocess` ``interpolation`` -> the swscale kernel that resizes the frames."""
RESIZE_MODES = ("shortest", "squash", "longest")


def preprocess_spec(size: int, record: Mapping[str, Any] | None = None) -> Preprocess:
    """The :class:`~shards.backbones.Preprocess` at side ``size`` of a manifest's ``preprocess`` entry
    (:meth:`~shards.backbones.Preprocess.record`); ``None``: the reference's (OpenAI CLIP's: short side
    to ``size``, bicubic, centre crop, OpenAI mean and std), what stores made before the manifest
    recorded it were made with.

    Raises:
        ConfigError: the entry lacks a field or names a resize mode or interpolation not supported here.
    """
    entry = dict(REFERENCE_PREPROCESS if record is None else record)
    try:
        spec = Preprocess(
            size=int(size),
            resize_mode=str(entry["resize_mode"]),
            interpolation=str(entry["interpolation"]),
            mean=tuple(float(m) for m in entry["mean"]),
            std=tuple(float(s) for s in entry["std"]),
            fill_color=int(entry.get("fill_color", 0)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"the preprocessing {entry!r} is incomplete or malformed ({err})") from None
    check_spec(spec)
    return spec


def check_spec(spec: Preprocess) -> None:
    """Refuse a :class:`~shards.backbones.Preprocess` the filter chain cannot follow.

    Raises:
        ConfigError: unknown resize mode or interpolation, a side below 1, not three means and stds.
    """
    if spec.resize_mode not in RESIZE_MODES:
        raise ConfigError(
            f"resize mode {spec.resize_mode!r} is not supported: frames are made by "
            f"{', '.join(RESIZE_MODES)}"
        )
    if spec.interpolation not in SCALE_FLAGS:
        raise ConfigError(
            f"interpolation {spec.interpolation!r} is not supported: use {', '.join(SCALE_FLAGS)}"
        )
    if spec.size < 1 or len(spec.mean) != 3 or len(spec.std) != 3 or not 0 <= spec.fill_color <= 255:
        raise ConfigError(
            f"bad preprocessing: side {spec.size}, mean {spec.mean}, std {spec.std}, fill {spec.fill_color} "
            "(want a side >= 1, three means and stds, a fill of 0..255)"
        )


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video's first video stream.

    Attributes:
        width, height: displayed size in pixels (after the rotation below).
        rotation: counter-clockwise display rotation in degrees (0, 90, 180, 270).
        duration: seconds (container duration when the stream has none), ``None`` if unknown.
        rate: average frame rate in frames per second, ``None`` if unknown.
        codec: decoder name, e.g. ``h264``.
    """

    width: int
    height: int
    rotation: int
    duration: float | None
    rate: float | None
    codec: str


def scaled_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Size ``(w', h')`` the reference scales to: short side ``size``, long ``int(long * size / short)``."""
    if width > height:
        return int(width * size / height), size
    return size, int(height * size / width)


def crop_offset(width: int, height: int, size: int) -> tuple[int, int]:
    """Top-left corner ``(x, y)`` of the centre crop, ``int((w' - size) / 2)`` as in the reference."""
    return int((width - size) / 2), int((height - size) / 2)


def kept_ratio_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Size ``(w', h')`` of ``longest``: long side ``size``, short ``round(short * size / long)`` (at least
    1), as open_clip's ``ResizeKeepRatio(longest=1)``."""
    ratio = max(width, height) / size
    return max(1, round(width / ratio)), max(1, round(height / ratio))


def _resize_filters(width: int, height: int, spec: Preprocess) -> list[tuple[str, str]]:
    """libavfilter filters that turn a ``width`` x ``height`` picture into ``spec.size`` x ``spec.size``
    ``rgb24`` the way ``spec.resize_mode`` says (module docstring)."""
    size, flags = spec.size, SCALE_FLAGS[spec.interpolation]
    if spec.resize_mode == "squash":
        return [("scale", f"{size}:{size}:flags={flags}"), ("format", "rgb24")]
    if spec.resize_mode == "longest":
        sw, sh = kept_ratio_size(width, height, size)
        x, y = (size - sw) // 2, (size - sh) // 2
        color = "0x" + f"{spec.fill_color:02x}" * 3
        return [
            ("scale", f"{sw}:{sh}:flags={flags}"),
            ("format", "rgb24"),
            ("pad", f"{size}:{size}:{x}:{y}:color={color}"),
        ]
    sw, sh = scaled_size(width, height, size)
    x, y = crop_offset(sw, sh, size)
    return [("scale", f"{sw}:{sh}:flags={flags}"), ("crop", f"{size}:{size}:{x}:{y}"), ("format", "rgb24")]


def _right_angle(rotation: float) -> int:
    """Nearest multiple of 90 degrees in ``[0, 360)`` (counter-clockwise)."""
    return int(round(rotation / 90.0)) % 4 * 90


def _rotation_filters(rotation: int) -> list[tuple[str, str]]:
    """libavfilter filters that display a frame with counter-clockwise ``rotation`` upright."""
    return {
        0: [],
        90: [("transpose", "cclock")],
        180: [("hflip", ""), ("vflip", "")],
        270: [("transpose", "clock")],
    }[rotation]


class _FilterChain:
    """A configured libavfilter graph ``buffer -> [rotate] -> [fps] -> resize (``spec``) -> rgb24 -> sink``;
    the resize is ``scale -> crop`` (``shortest``), ``scale`` (``squash``) or ``scale -> pad``
    (``longest``)."""

    def __init__(
        self,
        frame: av.VideoFrame,
        time_base: Fraction,
        spec: Preprocess,
        fps: float | None,
        rotation: int,
    ) -> None:
        width, height = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
        self.graph = av.filter.Graph()
        nodes = [
            self.graph.add_buffer(
                width=frame.width, height=frame.height, format=frame.format, time_base=time_base
            )
        ]
        steps = list(_rotation_filters(rotation))
        if fps is not None:
            steps.append(("fps", str(float(fps))))
        steps += _resize_filters(width, height, spec)
        nodes += [self.graph.add(name, args) for name, args in steps]
        nodes.append(self.graph.add("buffersink"))
        for a, b in zip(nodes, nodes[1:], strict=False):
            a.link_to(b)
        self.graph.configure()

    def push(self, frame: av.VideoFrame | None) -> Iterator[np.ndarray]:
        """Feed one frame (``None`` = end of stream); yield every frame that came out, ``(S, S, 3)`` uint8."""
        self.graph.push(frame)
        while True:
            try:
                out = self.graph.pull()
            except (av.BlockingIOError, av.EOFError):
                return
            yield out.to_ndarray()


def preprocess(
    frames: np.ndarray | torch.Tensor,
    device: str | torch.device | None = None,
    spec: Preprocess | None = None,
) -> torch.Tensor:
    """Normalise frames for the image tower: ``(N, H, W, 3)`` uint8 -> ``(N, 3, H, W)`` float32 on ``device``.

    ``x / 255``, then ``(x - mean) / std`` per channel with the mean and std of ``spec`` (the
    backbone's :attr:`~extract.backbone.BackboneInfo.preprocess`; ``None``: OpenAI CLIP's). The
    uint8 frames are moved to ``device`` first, so a GPU receives 4x fewer bytes; from pinned memory
    the copy is asynchronous (the caller keeps the frames unchanged until the device has read them).
    """
    import torch  # here, not at the top: the readers of this module serve without torch

    if isinstance(frames, np.ndarray) and not frames.flags.writeable:
        frames = frames.copy()
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 frames, got {tuple(x.shape)} {x.dtype}")
    x = x.to(device if device is not None else "cpu", non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean_std = (spec.mean, spec.std) if spec is not None else (OPENAI_MEAN, OPENAI_STD)
    mean = torch.tensor(mean_std[0]).to(x.device, non_blocking=True).view(1, 3, 1, 1)  # no wait for the GPU
    std = torch.tensor(mean_std[1]).to(x.device, non_blocking=True).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


def _open(path: Path) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """Open ``path`` and return its container and first video stream; :class:`VideoError` when impossible."""
    if not path.is_file():
        raise VideoError(f"{path}: missing file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        raise VideoError(f"{path}: not a readable video ({_reason(err)})") from err
    if not container.streams.video:
        kinds = sorted({str(s.type) for s in container.streams}) or ["none"]
        container.close()
        raise VideoError(f"{path}: no video stream (streams: {', '.join(kinds)})")
    return container, container.streams.video[0]


def _reason(err: BaseException) -> str:
    """Short description of a PyAV error without the file name it repeats."""
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def probe(path: str | Path) -> VideoInfo:
    """Read the first video stream's displayed size, rotation, duration and rate (decodes one frame).

    Raises:
        VideoError: missing, empty, undecodable or video-less file.
    """
    path = Path(path)
    container, stream = _open(path)
    with container:
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as err:
            raise VideoError(f"{path}: cannot decode the first frame ({_reason(err)})") from err
        if first is None:
            raise VideoError(f"{path}: the video stream has no frames")
        rotation = _right_angle(first.rotation)
        width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
        rate = float(stream.average_rate) if stream.average_rate else None
        duration = _declared_duration(container, stream)
        return VideoInfo(width, height, rotation, duration, rate, stream.codec_context.name)


def _declared_duration(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> float | None:
    """Seconds the video stream declares (the container's duration when the stream has none), or ``None``."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1e6
    return None


def video_duration(path: str | Path) -> float:
    """Length of ``path``'s first video stream in seconds, from the container's metadata (nothing is
    decoded; when the metadata has no duration, the packets' timestamps are read instead).

    Raises:
        VideoError: missing, empty, unreadable or video-less file, or one whose packets carry no time.
    """
    path = Path(path)
    container, stream = _open(path)
    with container:
        duration = _declared_duration(container, stream)
        if duration is not None and duration > 0:
            return duration
        start, end = stream.start_time or 0, None
        try:
            for packet in container.demux(stream):
                if packet.pts is not None:
                    stop = packet.pts + (packet.duration or 0) - start
                    end = stop if end is None else max(end, stop)
        except av.FFmpegError as err:
            raise VideoError(f"{path}: cannot read the video's length ({_reason(err)})") from err
        if end is None or end <= 0 or stream.time_base is None:
            raise VideoError(f"{path}: the video's length is unknown (no duration, no timestamps)")
        return float(end * stream.time_base)


def _check_complete(
    path: Path, stream: av.video.stream.VideoStream, offset: int, last_pts: int, last_duration: int | None
) -> None:
    """Raise :class:`VideoError` when decoding ended well before the end the stream declares.

    A cut-off download whose index survived decodes without error (frame-threaded decoders
    conceal the broken last packet), but stops early: more than ``max(2 s, 5 %)`` missing.
    """
    if stream.duration is None or not stream.time_base:
        return
    tb = stream.time_base
    step = last_duration or (round(1 / (stream.average_rate * tb)) if stream.average_rate else 0)
    declared = float((stream.duration + (stream.start_time or 0) - offset) * tb)
    decoded = float((last_pts + step) * tb)
    if declared - decoded > max(TRUNCATION_TOLERANCE, 0.05 * declared):
        raise VideoError(
            f"{path}: decoding stopped at {decoded:.2f} s but the video stream should last {declared:.2f} s; "
            "the file is truncated"
        )


def sample_frames(
    path: str | Path, fps: float, size: int | Preprocess = 224, threads: int = 0
) -> Iterator[np.ndarray]:
    """Stream the frames the reference samples from ``path`` at ``fps`` frames per second.

    Yields ``(S, S, 3)`` uint8 RGB frames, one per ``1 / fps`` seconds (about
    ``round(duration * fps)`` frames): the last source frame before the middle of each clip,
    resized as ``size`` says: a backbone's :class:`~shards.backbones.Preprocess` (side ``S =
    size.size``, its resize mode and interpolation: module docstring), or a side ``S`` for the
    reference's way (short side to ``S``, bicubic, centre crop). Decoding is streamed:
    memory does not grow with the video's length. ``threads``: FFmpeg decoding threads (frame and
    slice threading; 0 = FFmpeg's choice, about one per core); the frames do not depend on it.

    Raises:
        VideoError: the file is missing, empty, not a video, has no video stream, fails to
            decode (corrupt), or ends well before its declared duration (truncated); the
            message names the file and the reason. Frames already yielded before the error
            are not retracted (the caller discards the video).
        ConfigError: a resize mode or interpolation not supported here (:func:`check_spec`).
    """
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    spec = preprocess_spec(size) if isinstance(size, int) else size
    check_spec(spec)
    path = Path(path)
    container, stream = _open(path)
    with container:
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        time_base = stream.time_base or Fraction(1, 1000)
        start = container.start_time or 0  # microseconds, removed like the ffmpeg command line does
        offset = (start * time_base.denominator + time_base.numerator * 500_000) // (
            time_base.numerator * 1_000_000
        )
        chain: _FilterChain | None = None
        last_pts: int | None = None
        last_duration: int | None = None
        decoded = 0
        try:
            for frame in container.decode(stream):
                pts = frame.pts if frame.pts is not None else frame.dts
                if pts is None:
                    pts = 0 if last_pts is None else last_pts + 1
                else:
                    pts -= offset
                last_pts = frame.pts = pts
                last_duration = frame.duration
                if chain is None:
                    chain = _FilterChain(frame, time_base, spec, fps, _right_angle(frame.rotation))
                decoded += 1
                yield from chain.push(frame)
            if chain is None or last_pts is None:
                raise VideoError(f"{path}: the video stream has no frames")
            _check_complete(path, stream, offset, last_pts, last_duration)
            yield from chain.push(None)
        except av.FFmpegError as err:
            at = f" at {float(last_pts * time_base):.2f} s" if last_pts is not None else ""
            raise VideoError(
                f"{path}: decoding failed after {decoded} frames{at} ({_reason(err)}); "
                "the file is truncated or corrupt"
            ) from err
