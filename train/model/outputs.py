"""What the R² model returns: every intermediate a loss, decoder or parity test needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class R2Output:
    """Outputs of :class:`train.model.r2tuning.R2Tuning` for a batch (time unit: clips).

    Shapes: B batch, T frames (padded), L query tokens (padded), k fused layers, D model width,
    N = Σ_l T_l points over the pyramid levels (stride-1 level first).

    Attributes:
        video_mask: (B, T) bool, True = real frame.
        query_mask: (B, L) bool, True = real token.
        adapter_video: (B, T, D) R²-block output.
        video_emb: (B, T, D) ``ReLU(adapter_video)``, the stride-1 pyramid level; used for saliency.
        query_tokens: (B, L, D) query tokens of the earliest fused layer.
        query_emb: (B, D) attentive pooling of ``query_tokens``.
        coll_v: (k, B, T, D) per-layer CLS features (layers k-1 ... 0), for the calibration losses.
        coll_q: (k, B, L, D) per-layer query tokens (same order).
        coll_q_emb: (k, B, D) attentive pooling of each ``coll_q`` layer.
        level_sizes: T_l of each pyramid level.
        pymid_mask: (B, N) bool, valid pyramid steps.
        points: (N, 4) ``[t, reg_min, reg_max, stride]`` (see :class:`train.model.points.PointGenerator`).
        class_logits: (B, N) foreground logits.
        coord_raw: (B, N, 2) coordinate head output before ``exp`` (``None`` without coord head).
        coord: (B, N, 2) ``exp(coord_raw) * coef[level]``: distances to start/end in strides.
        losses: ``{'loss_cls': ..., ...}`` weighted scalar losses when targets were given.
    """

    video_mask: torch.Tensor
    query_mask: torch.Tensor
    adapter_video: torch.Tensor
    video_emb: torch.Tensor
    query_tokens: torch.Tensor
    query_emb: torch.Tensor
    coll_v: torch.Tensor
    coll_q: torch.Tensor
    coll_q_emb: torch.Tensor
    level_sizes: list[int]
    pymid_mask: torch.Tensor
    points: torch.Tensor
    class_logits: torch.Tensor
    coord_raw: torch.Tensor | None
    coord: torch.Tensor | None
    losses: dict[str, torch.Tensor] | None = None

    @property
    def loss(self) -> torch.Tensor:
        """Sum of all losses (the training objective)."""
        if not self.losses:
            raise ValueError("no losses: call the model with targets")
        return torch.stack(list(self.losses.values())).sum()
