"""Ground sentences in a raw video: frozen CLIP on the fly + a trained R² checkpoint.

This is the one place that joins extraction and the model. It is stateless in the lighthouse
style: encode a video once, then ask any number of sentences about it.

>>> predictor = Predictor.from_checkpoint("runs/demo/best.pt")
>>> video = predictor.encode_video("cooking.mp4")           # tokens (T, k, P, C), fps
>>> result = predictor.predict(video, "a man cuts an onion")
>>> result.moments[:3]                                       # [[start_s, end_s, score], ...]

The backbone is the one the checkpoint was trained on, rebuilt from the store identity saved in the
checkpoint: architecture, weights, k, fps, the towers' precision, the token pooling
(``token_pool``), the frames' preprocessing (``frame_size`` and ``preprocess``: resize mode,
interpolation, mean and std) and the token dtype (``int8`` tokens are quantized and dequantized as
the store did, :func:`shards.quant.roundtrip`, so the model sees what it was trained on).
Checkpoints of stores made before these fields existed get the defaults of
:data:`shards.manifest.DEFAULTS` (the reference's preprocessing, no pooling, float16). Other weights,
and another rate than a fixed-rate store's, are refused. Long videos are cut into overlapping
windows of at most ``window`` clips; a video gives at most :data:`MAX_CLIPS` clips.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.postprocess import postprocess_for
from extract.backbone import ClipBackbone, load_backbone
from extract.frames import preprocess, preprocess_spec, probe, sample_frames
from shards.backbones import Preprocess
from shards.errors import CheckpointError, ConfigError, VideoError
from shards.manifest import DEFAULTS
from shards.quant import roundtrip
from train.checkpoint import read_checkpoint
from train.inference import Grounder

DEFAULT_WINDOW = 1024
"""Most clips the model sees at once (the reference model's positional-encoding and point buffers
hold 1,024 clips; its training videos are far shorter)."""
MAX_CLIPS = 8 * DEFAULT_WINDOW
"""Most clips one video may give (its duration × fps): 8,192, the model's 1,024-clip buffer eight
times over, i.e. 15 windows overlapping by half; a 2 h 16 min video at 1 fps. Every clip is one
image-tower forward, so this bounds the time ``encode_video`` takes."""


@dataclass
class EncodedVideo:
    """Visual tokens of one video.

    Attributes:
        path: the video file.
        tokens: ``(T, k, P, C)`` float16 block outputs of the image tower, one row per sampled clip
            (pooled, and passed through the store's dtype, as the checkpoint's store holds them).
        fps: clips per second; clip ``t`` covers ``[t / fps, (t + 1) / fps)`` seconds.
        seconds: the video's length as its container gives it (``None`` when it does not say).
    """

    path: Path
    tokens: np.ndarray
    fps: float
    seconds: float | None = None

    @property
    def duration(self) -> float:
        """The video's length in seconds: the container's, else the clips' (``T / fps``, which rounds
        it to a whole clip: 31 s for a 30.7-s video at 1 fps)."""
        return self.seconds if self.seconds is not None else len(self.tokens) / self.fps


@dataclass
class VideoPrediction:
    """Moments and saliency of one sentence in one video.

    Attributes:
        query: the sentence.
        moments: ``(N, 3)`` ``[start_s, end_s, score]`` clamped to the video, NMS-ed as the
            checkpoint's dataset is evaluated, best first.
        saliency: ``(T,)`` per-clip saliency.
        fps: clips per second of ``saliency``.
    """

    query: str
    moments: np.ndarray
    saliency: np.ndarray
    fps: float


class Predictor:
    """A checkpoint plus the backbone its store was extracted with.

    Args:
        grounder: the trained model (:class:`train.inference.Grounder`).
        backbone: the frozen CLIP model.
        fps: sampling rate of the training store.
        window: most clips per model call; longer videos use windows overlapping by half.
        chosen_rate: ``fps`` was chosen by the user (a per-video-rate checkpoint), so it may not
            exceed a video's frame rate (faster clips would only repeat frames).
        frames: how frames are made and normalised (the store's preprocessing); default: the
            backbone's own.
        dtype: the store's token dtype (``float16``, or ``int8``: tokens go through
            :func:`shards.quant.roundtrip`).
    """

    def __init__(
        self,
        grounder: Grounder,
        backbone: ClipBackbone,
        fps: float,
        window: int = DEFAULT_WINDOW,
        chosen_rate: bool = False,
        frames: Preprocess | None = None,
        dtype: str = "float16",
    ):
        self.grounder = grounder
        self.backbone = backbone
        self.fps = fps
        self.window = window
        self.chosen_rate = chosen_rate
        self.frames = frames or backbone.preprocess
        self.dtype = dtype

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        device: str = "cpu",
        weights: str | None = None,
        fps: float | None = None,
        window: int = DEFAULT_WINDOW,
        precision: str | None = None,
    ) -> Predictor:
        """Load a checkpoint written by ``r2 train`` and the backbone its store was built with
        (architecture, weights, pooling, preprocessing, dtype: module docstring).

        Args:
            checkpoint: ``best.pt`` / ``last.pt`` of a run.
            device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
            weights: CLIP weights to use instead of the manifest's ``pretrained`` (e.g. the weights
                file moved); its checksum must still match the manifest's.
            fps: sampling rate (clips per second) for stores extracted at a per-video rate (YouTube
                Highlights); for a fixed-rate store it may only repeat the store's rate.
            window: most clips per model call.
            precision: what the CLIP towers compute in, ``fp32`` or ``fp16`` (autocast); default:
                the store's (``fp32`` for stores of earlier versions).

        Raises:
            CheckpointError: the checkpoint has no store manifest, or the weights differ from it.
            ConfigError: ``fps`` is not a finite positive number, differs from a fixed-rate store's,
                or is missing for a per-video-rate store; unknown ``precision``; a recorded
                preprocessing the frame path cannot follow.
        """
        manifest = read_checkpoint(checkpoint).meta.get("store")
        if not isinstance(manifest, dict):
            raise CheckpointError(
                f"{checkpoint} records no feature-store manifest, so the CLIP backbone it needs is unknown: "
                "use a checkpoint written by `r2 train`"
            )
        rate = _rate(checkpoint, manifest.get("fps"), fps)
        backbone = load_backbone(
            manifest["backbone"],
            weights or manifest["pretrained"],
            layers=int(manifest["layers"]),
            device=device,
            precision=precision or manifest.get("precision", DEFAULTS["precision"]),
            token_pool=int(manifest.get("token_pool", DEFAULTS["token_pool"])),
        )
        if backbone.weights_sha256 != manifest["weights_sha256"]:
            raise CheckpointError(
                f"the CLIP weights {backbone.pretrained!r} (sha256 {backbone.weights_sha256[:12]}…) are not "
                f"the ones {checkpoint} was trained on (sha256 {manifest['weights_sha256'][:12]}…, "
                f"pretrained {manifest['pretrained']!r}): pass the original weights with --weights"
            )
        size = int(manifest.get("frame_size", backbone.frame_size))
        frames = preprocess_spec(size, manifest.get("preprocess"))
        grounder = Grounder.from_checkpoint(checkpoint, device=backbone.device)
        return cls(
            grounder,
            backbone,
            rate,
            window,
            chosen_rate=manifest.get("fps") is None,
            frames=frames,
            dtype=str(manifest.get("dtype", "float16")),
        )

    def check_video(self, path: str | Path) -> float | None:
        """Refuse ``path`` before decoding it when it would give more than :data:`MAX_CLIPS` clips at
        ``self.fps`` (duration × fps), or when a chosen rate exceeds its frame rate; returns its
        duration in seconds (``None`` when the container does not say).

        Raises:
            VideoError: a folder, a missing or undecodable file, too many clips, too high a rate.
        """
        path = Path(path)
        if path.is_dir():
            raise VideoError(f"{path} is a folder, not a video file")
        info = probe(path)
        if self.chosen_rate and info.rate is not None and self.fps > info.rate * (1 + 1e-6):
            raise VideoError(
                f"--fps {self.fps:g} is above the {info.rate:g} fps frame rate of {path}: its clips would "
                f"repeat frames; use --fps of at most {info.rate:g}"
            )
        if info.duration is not None and round(info.duration * self.fps) > MAX_CLIPS:
            raise VideoError(_too_many_clips(path, round(info.duration * self.fps), self.fps, info.duration))
        return info.duration

    def encode_video(
        self,
        path: str | Path,
        batch_size: int = 32,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> EncodedVideo:
        """Sample ``path`` at the checkpoint's fps, made as its store's frames were, and run the frozen
        image tower on them.

        Frames are streamed in batches of ``batch_size``; only the fp16 tokens are kept (passed through
        the store's dtype). The video is checked first (:meth:`check_video`), and stopped should it
        give more than :data:`MAX_CLIPS` clips all the same (a container that understates its duration).
        ``progress(done, expected)`` is called after each batch with the clips encoded so far and
        the clips the duration promises (``round(duration * fps)``, ``None`` when unknown); an
        exception it raises stops the encoding.

        Raises:
            VideoError: a folder, a missing or undecodable file, no clip at all (a video shorter
                than about half a clip), more than :data:`MAX_CLIPS` clips, or a chosen rate above
                the video's frame rate.
        """
        duration = self.check_video(path)
        expected = None if duration is None else round(duration * self.fps)
        chunks: list[np.ndarray] = []
        batch: list[np.ndarray] = []

        def flush() -> None:
            images = preprocess(np.stack(batch), self.backbone.device, self.frames)
            chunks.append(self.backbone.encode_frames(images).to("cpu", torch.float16).numpy())
            batch.clear()
            if progress is not None:
                progress(sum(len(chunk) for chunk in chunks), expected)

        for clips, frame in enumerate(sample_frames(path, self.fps, self.frames), 1):
            if clips > MAX_CLIPS:
                raise VideoError(_too_many_clips(Path(path), clips, self.fps, None))
            batch.append(frame)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        if not chunks:
            lasts = "" if duration is None else f" (the video lasts {duration:g} s)"
            raise VideoError(f"{path}: no frames could be sampled at {self.fps:g} fps{lasts}")
        tokens = roundtrip(np.concatenate(chunks), self.dtype)
        return EncodedVideo(Path(path), tokens, self.fps, duration)

    def encode_query(self, text: str) -> np.ndarray:
        """Text tokens of one sentence: ``(L, k, Cq)`` float16, SOT..EOT."""
        return self.backbone.encode_texts([text])[0].to("cpu", torch.float16).numpy()

    def predict(self, video: EncodedVideo, text: str) -> VideoPrediction:
        """Moments and saliency of ``text`` in ``video``, post-processed like the evaluation of the
        checkpoint's dataset (:func:`eval.postprocess.postprocess_for`)."""
        query = self.encode_query(text)
        windows, saliency = self._predict_windows(video.tokens, query, video.fps)
        moments = postprocess_for(self.grounder.cfg.dataset, windows, video.duration)
        return VideoPrediction(text, moments, saliency, video.fps)

    def _predict_windows(
        self, tokens: np.ndarray, query: np.ndarray, fps: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Run the model on windows of at most ``self.window`` clips overlapping by half.

        Returns raw windows ``(N, 3)`` in video seconds (all windows' moments) and the ``(T,)``
        saliency averaged where windows overlap.
        """
        total = len(tokens)
        size = min(self.window, total)
        hop = max(size // 2, 1)
        starts = list(range(0, max(total - size, 0) + 1, hop))
        if starts[-1] + size < total:
            starts.append(total - size)
        saliency = np.zeros(total, np.float64)
        counts = np.zeros(total, np.float64)
        moments = []
        for start in starts:
            pred = self.grounder.predict(tokens[start : start + size], query, fps)
            saliency[start : start + size] += pred.saliency
            counts[start : start + size] += 1
            shifted = pred.moments.astype(np.float64).copy()
            shifted[:, :2] += start / fps
            moments.append(shifted)
        windows = np.concatenate(moments)
        windows = windows[np.argsort(-windows[:, 2], kind="stable")]
        return windows, (saliency / counts).astype(np.float32)


def _rate(checkpoint: str | Path, stored: Any, fps: float | None) -> float:
    """The sampling rate to use: the fixed-rate store's ``stored`` rate, or ``fps`` for a per-video-rate
    store (``stored`` is ``None``). :class:`ConfigError` for a non-finite or non-positive ``fps``, one
    that differs from ``stored``, or none for a per-video-rate store; :class:`CheckpointError` for a
    recorded rate that is not a positive number."""
    if stored is not None and not (isinstance(stored, int | float) and math.isfinite(stored) and stored > 0):
        raise CheckpointError(f"{checkpoint} records a store rate of {stored!r}, not a positive number")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ConfigError(f"--fps must be a finite number of clips per second above 0, got {fps:g}")
    if stored is not None:
        if fps is not None and not math.isclose(fps, stored, rel_tol=1e-9):
            raise ConfigError(
                f"{checkpoint} was trained on features sampled at {stored:g} fps, not {fps:g}: "
                "the model only knows clips of that length; leave --fps out"
            )
        return float(stored)
    if fps is None:
        raise ConfigError(
            f"{checkpoint} was trained on features sampled at a per-video rate: give the rate with --fps"
        )
    return float(fps)


def _too_many_clips(path: Path, clips: int, fps: float, duration: float | None) -> str:
    """The message for a video of ``clips`` > :data:`MAX_CLIPS` clips at ``fps`` (``duration`` in seconds,
    ``None`` when unknown: ``clips`` were counted while decoding, and there may be more)."""
    if duration is None:
        what, fix = f"{path} gives more than {clips - 1} clips at {fps:g} fps", "a lower --fps"
    else:
        what, fix = f"{path} lasts {duration:g} s: at {fps:g} fps that is {clips} clips", (
            f"--fps of at most {MAX_CLIPS / duration:g}"
        )
    return (
        f"{what}, more than the {MAX_CLIPS} r2 predict takes (r2.predict.MAX_CLIPS, bounding the time "
        f"CLIP takes): use {fix}, or cut the video into parts"
    )
