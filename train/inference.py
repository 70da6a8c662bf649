"""Inference on cached CLIP tokens: ``Grounder`` grounds a sentence in a video from a checkpoint.

>>> grounder = Grounder.from_checkpoint("runs/qvh/best.pt")
>>> pred = grounder.predict(video_tokens, query_tokens, fps=0.5)   # (T, k, P, C), (L, k, Cq)
>>> pred.moments[:3]        # [[start_s, end_s, score], ...] best first
>>> pred.saliency           # (T,) per-clip saliency

Predictions are the raw model output (the reference's test mode): windows are not clamped to the
video, not rounded to the clip unit and not NMS-ed; ``eval/postprocess.py`` does that for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shards.errors import R2Error
from train.checkpoint import load_checkpoint
from train.config import RunConfig, get_preset
from train.model import R2Tuning, decode_sample


class TokenShapeError(R2Error):
    """Cached tokens whose shape does not fit the model (another backbone or too few layers)."""


@dataclass
class Prediction:
    """Raw prediction for one (video, query) pair.

    Attributes:
        moments: (N, 3) float32 ``[start_s, end_s, score]`` sorted by score, descending
            (N ≤ ``model.max_num_moment``; (0, 3) for highlight-only models).
        saliency: (T,) float32 per-clip saliency.
    """

    moments: np.ndarray
    saliency: np.ndarray


class Grounder:
    """A trained R² model ready for inference on cached tokens.

    Args:
        model: the model (put in eval mode on ``device``).
        cfg: its run config.
        device: torch device.
    """

    def __init__(self, model: R2Tuning, cfg: RunConfig, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.cfg = cfg

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        preset: str | None = None,
        arch: str = "ViT-B-32",
    ) -> Grounder:
        """Load a checkpoint written by :func:`train.checkpoint.save_checkpoint`, or an official one.

        ``preset`` (with ``arch``) builds the config instead of the stored one; it is required for
        official checkpoints, which store no config.

        Raises:
            CheckpointError: missing/corrupt file or weights that do not fit the config.
            ConfigError: unknown preset or backbone.
        """
        cfg = get_preset(preset, arch=arch) if preset is not None else None
        model, cfg, _ = load_checkpoint(path, cfg=cfg, device=device)
        return cls(model, cfg, device)

    @torch.no_grad()
    def predict(
        self, video_tokens: np.ndarray | torch.Tensor, query_tokens: np.ndarray | torch.Tensor, fps: float
    ) -> Prediction:
        """Moments and saliency of one query in one video.

        Args:
            video_tokens: (T, k', P, C) visual tokens of the last k' ≥ k CLIP layers (fp16 or fp32).
            query_tokens: (L, k', Cq) text tokens (SOT ... EOT).
            fps: clips per second of ``video_tokens``.

        Raises:
            TokenShapeError: the token shapes do not fit the model's backbone or layer count.
        """
        video = torch.as_tensor(video_tokens).to(self.device, torch.float32)
        query = torch.as_tensor(query_tokens).to(self.device, torch.float32)
        self._check_shapes(video, query, fps)
        out = self.model(
            video[None],
            torch.ones(1, video.size(0), dtype=torch.bool, device=self.device),
            query[None],
            torch.ones(1, query.size(0), dtype=torch.bool, device=self.device),
        )
        model_cfg = self.cfg.model
        windows, saliency = decode_sample(
            out, 0, float(fps), model_cfg.max_num_moment, model_cfg.merge_cls_sal
        )
        moments = (
            np.zeros((0, 3), np.float32) if windows is None else windows.cpu().numpy().astype(np.float32)
        )
        return Prediction(moments=moments, saliency=saliency.cpu().numpy().astype(np.float32))

    def _check_shapes(self, video: torch.Tensor, query: torch.Tensor, fps: float) -> None:
        m = self.cfg.model
        p, c, cq = m.token_dims()
        if video.dim() != 4 or video.size(0) < 1 or video.size(1) < m.layers or video.shape[2:] != (p, c):
            raise TokenShapeError(
                f"video tokens of shape {tuple(video.shape)} do not fit the {m.arch} model, which expects "
                f"(T, >={m.layers}, {p}, {c}): use tokens extracted with {m.arch} (k >= {m.layers}) "
                "or a matching checkpoint"
            )
        if query.dim() != 3 or query.size(0) < 1 or query.size(1) < m.layers or query.size(2) != cq:
            raise TokenShapeError(
                f"query tokens of shape {tuple(query.shape)} do not fit the {m.arch} model, which expects "
                f"(L, >={m.layers}, {cq}): use tokens extracted with {m.arch} (k >= {m.layers})"
            )
        if not fps > 0:
            raise TokenShapeError(f"fps must be > 0, got {fps}")
