"""BundleLoss of R²-Tuning: focal + L1 on the pyramid points, sampled NCE saliency, InfoNCE calibrations.

All losses are computed in fp32 and returned already multiplied by their weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from train.config import LossConfig
from train.model.outputs import R2Output
from train.model.targets import Targets, assign_targets


class FocalLoss(nn.Module):
    """Sigmoid focal loss without α weighting, averaged over the valid points (not the positives).

    ``Σ BCE(x, y) · (1 - p_t)^γ · mask / Σ mask`` with ``p_t = p·y + (1 - p)(1 - y)``.
    """

    def __init__(self, weight: float = 1.0, gamma: float = 2.0) -> None:
        super().__init__()
        self.weight = weight
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``logits``, ``target`` (B, N) float; ``mask`` (B, N) bool -> scalar."""
        prob = logits.sigmoid()
        p_t = prob * target + (1 - prob) * (1 - target)
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * (1 - p_t) ** self.gamma
        return self.weight * (loss * mask).sum() / mask.sum()


class DynamicBCELoss(nn.Module):
    """BCE with continuous targets (saliency), averaged over the valid frames: ``Σ BCE · mask / Σ mask``."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``logits``, ``target`` (B, T) float; ``mask`` (B, T) bool -> scalar."""
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return self.weight * (loss * mask).sum() / mask.sum()


class L1Loss(nn.Module):
    """Mean absolute error over both coordinates of the positive points (0 when there are none)."""

    def __init__(self, weight: float = 0.2) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """``pred``, ``target`` (B, N, 2); ``positive`` (B, N) bool -> scalar.

        Masked rather than indexed (a boolean index would make the host wait for the mask's count);
        the other points contribute exact zeros to the value and the gradient, non-finite ones too.
        """
        mask = positive[..., None].expand_as(pred)
        error = torch.where(mask, pred - target, 0.0).abs().sum()
        return self.weight * error / mask.sum().clamp(min=1)


class SampledNCELoss(nn.Module):
    """Contrastive saliency loss on cos(video frame, query) with a fixed temperature.

    ``sim[b, t] = cos(v[b, t], q[b]) / τ``; for sample b the positive is clip ``pos_b`` and the
    negatives are the valid clips whose saliency is not higher than the positive's.

    - ``row``: ``-mean_b log softmax_t(sim[b, :])[pos_b]`` (which clip matches the query),
    - ``col``: ``-mean_b log softmax_b'(sim[:, pos_b])[b]`` (which query matches the clip).

    The reference computes the ``col`` softmax for every time step, and a step masked for the whole
    batch gives NaN gradients (the loss value is finite). Only the ``pos_b`` columns enter the loss,
    so only those are computed here: same value, finite gradients.

    ``scale`` holds ``log(1 / τ)`` as a buffer (kept for state-dict parity with the reference).
    """

    def __init__(
        self,
        weight: float = 0.1,
        temperature: float = 0.07,
        max_scale: float = 100.0,
        direction: tuple[str, ...] = ("row", "col"),
    ) -> None:
        super().__init__()
        self.weight = weight
        self.max_scale = max_scale
        self.direction = tuple(direction)
        self.scale: torch.Tensor
        self.register_buffer("scale", torch.tensor([math.log(1 / temperature)]))

    def forward(
        self,
        video_emb: torch.Tensor,
        query_emb: torch.Tensor,
        video_mask: torch.Tensor,
        saliency: torch.Tensor,
        pos_clip: torch.Tensor,
    ) -> torch.Tensor:
        """``video_emb`` (B, T, D), ``query_emb`` (B, D), ``video_mask`` (B, T) bool, ``saliency`` (B, T),
        ``pos_clip`` (B,) long -> scalar."""
        batch = torch.arange(video_emb.size(0), device=video_emb.device)
        scale = self.scale.exp().clamp(max=self.max_scale)
        sim = F.cosine_similarity(video_emb, query_emb[:, None], dim=-1) * scale  # (B, T)
        pos_saliency = saliency[batch, pos_clip]
        candidates = (saliency <= pos_saliency[:, None]) & video_mask
        sim = sim.masked_fill(~candidates, float("-inf"))
        loss = sim.new_zeros(())
        if "row" in self.direction:
            loss = loss - sim.log_softmax(dim=1)[batch, pos_clip].mean()
        if "col" in self.direction:
            cols = sim[:, pos_clip].t()  # cols[b, b'] = sim[b', pos_b]
            loss = loss - cols.log_softmax(dim=1)[batch, batch].mean()
        return self.weight * loss


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE between matched rows of ``a`` and ``b`` (fixed temperature).

    For each leading index: ``S = norm(a) norm(b)ᵀ / τ`` (n, n); loss = ``(CE(S, I) + CE(Sᵀ, I)) / 2``,
    cross-entropies averaged over all rows of all leading indices.
    """

    def __init__(self, weight: float = 0.1, temperature: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        self.weight = weight
        self.scale = min(1 / temperature, max_scale)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a``, ``b`` (G, n, D) -> scalar."""
        sim = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-2, -1) * self.scale  # (G, n, n)
        target = torch.arange(sim.size(-1), device=sim.device).repeat(sim.size(0))
        loss_ab = F.cross_entropy(sim.flatten(0, 1), target)
        loss_ba = F.cross_entropy(sim.transpose(-2, -1).flatten(0, 1), target)
        return self.weight * (loss_ab + loss_ba) / 2


class BundleLoss(nn.Module):
    """All training losses of R²-Tuning.

    - ``loss_cls``: focal loss on the point classes (targets from GT windows, :func:`assign_targets`),
      or, for highlight-only configs, BCE against the frame saliency;
    - ``loss_reg``: L1 on the stride-normalised boundary distances of the positive points;
    - ``loss_sal``: :class:`SampledNCELoss` on ``video_emb`` vs ``query_emb``;
    - ``loss_video_cal``: per fused layer, InfoNCE across the batch between the CLS feature at the
      positive clip and the pooled query tokens of that layer (with B = 1 it is 0);
    - ``loss_layer_cal``: per sample, InfoNCE across the k layers (match each layer to itself).
    """

    def __init__(self, cfg: LossConfig, with_reg: bool = True) -> None:
        super().__init__()
        self.sample_radius = cfg.sample_radius
        if cfg.cls_loss == "focal":
            self._loss_cls: nn.Module = FocalLoss(cfg.cls_weight)
        else:
            self._loss_cls = DynamicBCELoss(cfg.cls_weight)
        self._loss_reg = L1Loss(cfg.reg_weight) if with_reg else None
        self._loss_sal = SampledNCELoss(cfg.sal_weight, cfg.temperature, direction=cfg.sal_direction)
        self._loss_video_cal = InfoNCELoss(cfg.video_cal_weight, cfg.temperature)
        self._loss_layer_cal = InfoNCELoss(cfg.layer_cal_weight, cfg.temperature)

    def forward(self, out: R2Output, targets: Targets) -> dict[str, torch.Tensor]:
        """Weighted scalar losses ``{'loss_cls', 'loss_reg' (with coord head), 'loss_sal', ...}``."""
        losses: dict[str, torch.Tensor] = {}
        saliency = targets.saliency.float()
        if isinstance(self._loss_cls, FocalLoss) or self._loss_reg is not None:
            if targets.boundary is None:
                raise ValueError("this model's losses need GT windows: Targets.boundary is None")
            cls_tgt, reg_tgt = assign_targets(out.points, targets.boundary, targets.fps, self.sample_radius)
        if isinstance(self._loss_cls, FocalLoss):
            losses["loss_cls"] = self._loss_cls(out.class_logits, cls_tgt, out.pymid_mask)
        else:
            frames = out.class_logits[:, : out.level_sizes[0]]  # stride-1 level: one logit per frame
            losses["loss_cls"] = self._loss_cls(frames, saliency, out.video_mask)
        if self._loss_reg is not None and out.coord is not None:
            losses["loss_reg"] = self._loss_reg(out.coord, reg_tgt, cls_tgt > 0)
        losses["loss_sal"] = self._loss_sal(
            out.video_emb.float(), out.query_emb, out.video_mask, saliency, targets.pos_clip
        )
        batch = torch.arange(out.coll_v.size(1), device=out.coll_v.device)
        video_pos = out.coll_v.float()[:, batch, targets.pos_clip]  # (k, B, D)
        losses["loss_video_cal"] = self._loss_video_cal(video_pos, out.coll_q_emb)
        losses["loss_layer_cal"] = self._loss_layer_cal(
            video_pos.transpose(0, 1), out.coll_q_emb.transpose(0, 1)
        )
        return losses
