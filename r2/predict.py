"""Ground sentences in a raw video: frozen CLIP on the fly + a trained R² checkpoint.

This is the one place that joins extraction and the model. It is stateless in the lighthouse
style: encode a video once, then ask any number of sentences about it.

>>> predictor = Predictor.from_checkpoint("runs/demo/best.pt")
>>> video = predictor.encode_video("cooking.mp4")           # tokens (T, k, P, C), fps
>>> result = predictor.predict(video, "a man cuts an onion")
>>> result.moments[:3]                                       # [[start_s, end_s, score], ...]

The backbone is the one the checkpoint was trained on (architecture, weights, k and fps from the
store identity saved in the checkpoint; the frame size follows from the architecture); other
weights are refused. Long videos are cut into overlapping windows of at most ``window`` clips,
so any length works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.postprocess import postprocess_for
from extract.backbone import ClipBackbone, load_backbone
from extract.frames import preprocess, sample_frames
from shards.errors import CheckpointError
from train.checkpoint import read_checkpoint
from train.inference import Grounder

DEFAULT_WINDOW = 1024
"""Most clips the model sees at once (the reference model's positional-encoding and point buffers
hold 1,024 clips; its training videos are far shorter)."""


@dataclass
class EncodedVideo:
    """Visual tokens of one video.

    Attributes:
        path: the video file.
        tokens: ``(T, k, P, C)`` float16 CLIP block outputs, one row per sampled clip.
        fps: clips per second; clip ``t`` covers ``[t / fps, (t + 1) / fps)`` seconds.
    """

    path: Path
    tokens: np.ndarray
    fps: float

    @property
    def duration(self) -> float:
        """Length covered by the clips, in seconds (``T / fps``)."""
        return len(self.tokens) / self.fps


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
    """

    def __init__(self, grounder: Grounder, backbone: ClipBackbone, fps: float, window: int = DEFAULT_WINDOW):
        self.grounder = grounder
        self.backbone = backbone
        self.fps = fps
        self.window = window

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        device: str = "cpu",
        weights: str | None = None,
        fps: float | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> Predictor:
        """Load a checkpoint written by ``r2 train`` and the CLIP backbone its store was built with.

        Args:
            checkpoint: ``best.pt`` / ``last.pt`` of a run.
            device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
            weights: CLIP weights to use instead of the manifest's ``pretrained`` (e.g. the weights
                file moved); its checksum must still match the manifest's.
            fps: sampling rate for stores extracted at a per-video rate (YouTube Highlights).
            window: most clips per model call.

        Raises:
            CheckpointError: the checkpoint has no store manifest, or the weights differ from it.
        """
        manifest = read_checkpoint(checkpoint).meta.get("store")
        if not isinstance(manifest, dict):
            raise CheckpointError(
                f"{checkpoint} records no feature-store manifest, so the CLIP backbone it needs is unknown: "
                "use a checkpoint written by `r2 train`"
            )
        backbone = load_backbone(
            manifest["backbone"],
            weights or manifest["pretrained"],
            layers=int(manifest["layers"]),
            device=device,
        )
        if backbone.weights_sha256 != manifest["weights_sha256"]:
            raise CheckpointError(
                f"the CLIP weights {backbone.pretrained!r} (sha256 {backbone.weights_sha256[:12]}…) are not "
                f"the ones {checkpoint} was trained on (sha256 {manifest['weights_sha256'][:12]}…, "
                f"pretrained {manifest['pretrained']!r}): pass the original weights with --weights"
            )
        rate = manifest.get("fps") or fps
        if not rate:
            raise CheckpointError(
                f"{checkpoint} was trained on features sampled at a per-video rate: give the rate with --fps"
            )
        grounder = Grounder.from_checkpoint(checkpoint, device=backbone.device)
        return cls(grounder, backbone, float(rate), window)

    def encode_video(self, path: str | Path, batch_size: int = 32) -> EncodedVideo:
        """Sample ``path`` at the checkpoint's fps and run frozen CLIP on the frames.

        Frames are streamed in batches of ``batch_size``; only the fp16 tokens are kept.

        Raises:
            VideoError: the file is missing or cannot be decoded.
        """
        chunks: list[np.ndarray] = []
        batch: list[np.ndarray] = []

        def flush() -> None:
            images = preprocess(np.stack(batch), device=self.backbone.device)
            chunks.append(self.backbone.encode_frames(images).to("cpu", torch.float16).numpy())
            batch.clear()

        for frame in sample_frames(path, self.fps, self.backbone.frame_size):
            batch.append(frame)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        return EncodedVideo(Path(path), np.concatenate(chunks), self.fps)

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
