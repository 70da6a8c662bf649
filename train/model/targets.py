"""Ground truth of a batch and its assignment to pyramid points (time unit: clips)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Targets:
    """Per-batch ground truth.

    Attributes:
        saliency: (B, T) float per-clip saliency in [0, 1], 0 on padded frames.
        pos_clip: (B,) long, index of one positive clip per sample (used by the NCE losses).
        fps: (B,) float, clips per second of each video.
        boundary: (B, M, 2) GT windows in **seconds**, padded rows ``+inf``; ``None`` for HD-only data.
    """

    saliency: torch.Tensor
    pos_clip: torch.Tensor
    fps: torch.Tensor
    boundary: torch.Tensor | None = None


def assign_targets(
    points: torch.Tensor, boundary: torch.Tensor, fps: torch.Tensor, sample_radius: float = 1.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class and regression targets of every point (FCOS-style with centre sampling).

    A point ``(t, reg_min, reg_max, s)`` is positive for GT window ``(gs, ge)`` (in clips) if it lies in
    the window's centre region ``[max(c - r·s, gs), min(c + r·s, ge)]`` (``c`` the centre, ``r`` the
    radius) and its largest distance ``max(t - gs, ge - t)`` is in ``[reg_min, reg_max]``. Among the
    matching windows the shortest one is assigned (first on ties).

    Args:
        points: (N, 4). boundary: (B, M, 2) seconds, padded rows ``+inf``. fps: (B,).

    Returns:
        cls_tgt (B, N) float in {0, 1}; reg_tgt (B, N, 2) distances ``(t - gs, ge - t) / s`` to the
        assigned window (meaningful where ``cls_tgt == 1`` only).
    """
    gt = boundary.float() * fps.float()[:, None, None]  # (B, M, 2) clips
    t, reg_min, reg_max, stride = (points[:, i, None] for i in range(4))  # each (N, 1)
    gs, ge = gt[:, None, :, 0], gt[:, None, :, 1]  # (B, 1, M)
    dist = torch.stack((t - gs, ge - t), dim=-1)  # (B, N, M, 2)
    centre = (gs + ge) / 2
    inner_start = torch.maximum(centre - sample_radius * stride, gs)
    inner_end = torch.minimum(centre + sample_radius * stride, ge)
    in_centre = (t - inner_start >= 0) & (inner_end - t >= 0)
    max_dist = dist.amax(dim=-1)
    in_range = (max_dist >= reg_min) & (max_dist <= reg_max)
    lengths = (ge - gs).expand_as(max_dist).masked_fill(~(in_centre & in_range), float("inf"))
    min_len, assigned = lengths.min(dim=-1)  # (B, N)
    cls_tgt = (min_len < float("inf")).float()
    index = assigned[..., None, None].expand(-1, -1, 1, 2)
    reg_tgt = dist.gather(2, index)[:, :, 0] / points[:, 3, None]
    return cls_tgt, reg_tgt
