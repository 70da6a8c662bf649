"""The R²-Tuning model on cached CLIP tokens: R² block -> conv pyramid -> heads, plus BundleLoss.

Parameter names equal the official checkpoints (``coef``, ``adapter.*``, ``pyramid.*``, ``pooling.*``,
``class_head.*``, ``coord_head.*``, buffer ``loss._loss_sal.scale``), so they load with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from train.config import LossConfig, ModelConfig
from train.model.heads import AdaPooling, ConvHead
from train.model.losses import BundleLoss
from train.model.outputs import R2Output
from train.model.points import PointGenerator
from train.model.pyramid import ConvPyramid
from train.model.r2block import R2Block
from train.model.targets import Targets


class R2Tuning(nn.Module):
    """R² block over the last k CLIP layers, temporal conv pyramid, shared class/coord heads.

    Forward (one core path, :meth:`forward`)::

        h, q, coll_v, coll_q = R2Block(video, query)       h (B, T, D), q (B, L, D)
        levels = ConvPyramid(h)                            level l: (B, T_l, D); level 0 = ReLU(h)
        video_emb = levels[0]                              used for saliency and the NCE loss
        query_emb = AdaPooling(q)                          (B, D)
        class_logits = cat_l ClassHead(levels[l])          (B, N)
        coord = cat_l exp(CoordHead(levels[l])) * coef[l]  (B, N, 2), distances in strides

    Pooling, heads and losses always run in fp32 (autocast disabled), as in the reference.

    Args:
        cfg: architecture; its token dims (P, C, Cq) must be known (``cfg.token_dims()`` raises
            ``ConfigError`` otherwise).
        loss_cfg: loss weights (defaults: the reference moment-retrieval losses).
    """

    def __init__(self, cfg: ModelConfig, loss_cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_dims = cfg.token_dims()
        loss_cfg = loss_cfg or LossConfig()
        self.coef = nn.Parameter(torch.ones(len(cfg.strides)))
        self.adapter = R2Block(
            self.token_dims.video_width,
            self.token_dims.text_width,
            dims=cfg.dims,
            layers=cfg.layers,
            use_tef=cfg.use_tef,
            dropout=cfg.dropout,
            heads=cfg.heads,
            ffn_ratio=cfg.ffn_ratio,
            droppath=cfg.droppath,
        )
        self.pyramid = ConvPyramid(cfg.dims, cfg.strides)
        self.pooling = AdaPooling(cfg.dims)
        self.class_head = ConvHead(cfg.dims, 1)
        self.coord_head = ConvHead(cfg.dims, 2) if cfg.coord_head else None
        self.generator = PointGenerator(cfg.strides)
        self.loss = BundleLoss(loss_cfg, with_reg=cfg.coord_head)

    def forward(
        self,
        video: torch.Tensor,
        video_mask: torch.Tensor,
        query: torch.Tensor,
        query_mask: torch.Tensor,
        targets: Targets | None = None,
    ) -> R2Output:
        """Run the model on a batch of cached tokens.

        Args:
            video: (B, T, N, P, C) float visual tokens of N >= k layers (the last k are used).
            video_mask: (B, T) bool, True = real frame.
            query: (B, L, N, Cq) float text tokens. query_mask: (B, L) bool, True = real token.
            targets: ground truth; when given, ``out.losses`` holds the weighted losses.

        The reference's calling convention (``model(data_dict, mode=...)``) is
        :func:`train.model.reference.forward_reference`.
        """
        video_mask, query_mask = video_mask.bool(), query_mask.bool()
        adapter_video, query_tokens, coll_v, coll_q = self.adapter(video, query, video_mask, query_mask)
        levels, level_masks = self.pyramid(adapter_video, video_mask)
        with torch.autocast(video.device.type, enabled=False):  # heads, pooling, losses: fp32
            levels = [level.float() for level in levels]
            class_logits, coord_raw, coord = self.heads(levels)
            coll_q_stack = torch.stack(coll_q).float()
            out = R2Output(
                video_mask=video_mask,
                query_mask=query_mask,
                adapter_video=adapter_video,
                video_emb=levels[0],
                query_tokens=query_tokens,
                query_emb=self.pooling(query_tokens.float(), query_mask),
                coll_v=torch.stack(coll_v),
                coll_q=coll_q_stack,
                coll_q_emb=torch.stack([self.pooling(q, query_mask) for q in coll_q_stack]),
                level_sizes=[level.size(1) for level in levels],
                pymid_mask=torch.cat(level_masks, dim=1),
                points=self.generator([level.size(1) for level in levels], video.device),
                class_logits=class_logits,
                coord_raw=coord_raw,
                coord=coord,
            )
            if targets is not None:
                out.losses = self.loss(out, targets)
        return out

    def heads(
        self, levels: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Shared heads over the pyramid levels [(B, T_l, D)], concatenated along time (N = Σ T_l).

        Returns:
            class logits (B, N); raw coord output (B, N, 2) and ``coord = exp(raw) * coef[level]``
            (B, N, 2), both ``None`` without coord head.
        """
        class_logits = torch.cat([self.class_head(level) for level in levels], dim=1)[..., 0]
        if self.coord_head is None:
            return class_logits, None, None
        raw = [self.coord_head(level) for level in levels]
        coord = torch.cat([r.exp() * self.coef[i] for i, r in enumerate(raw)], dim=1)
        return class_logits, torch.cat(raw, dim=1), coord


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
