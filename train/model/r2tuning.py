"""The R²-Tuning model on cached CLIP tokens: R² block -> conv pyramid -> heads, plus BundleLoss.

Parameter names equal the official checkpoints (``coef``, ``adapter.*``, ``pyramid.*``, ``pooling.*``,
``class_head.*``, ``coord_head.*``, buffer ``loss._loss_sal.scale``), so they load with ``strict=True``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train.config import LossConfig, ModelConfig
from train.model.decode import decode_sample
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
        video: torch.Tensor | dict[str, Any],
        video_mask: torch.Tensor | None = None,
        query: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        targets: Targets | None = None,
        mode: str = "test",
    ) -> R2Output | dict[str, Any]:
        """Run the model on a batch of cached tokens.

        Args:
            video: (B, T, N, P, C) float visual tokens of N >= k layers (the last k are used), or an
                official-style batch dict (then see :meth:`forward_official`; ``mode`` applies).
            video_mask: (B, T) bool, True = real frame.
            query: (B, L, N, Cq) float text tokens. query_mask: (B, L) bool, True = real token.
            targets: ground truth; when given, ``out.losses`` holds the weighted losses.

        Returns:
            :class:`R2Output` (a dict for the official calling convention).
        """
        if isinstance(video, dict):
            return self.forward_official(video, mode)
        if video_mask is None or query is None or query_mask is None:
            raise TypeError("R2Tuning needs video, video_mask, query and query_mask")
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

    def forward_official(self, data: dict[str, Any], mode: str = "test") -> dict[str, Any]:
        """The reference calling convention ``model(data, mode)`` (see tests/data/r2_parity/README.md).

        ``data['video']`` (B, T, N*P*C) and ``data['query']`` (B, L, N*Cq) are padded with ``+inf``
        (masks come from the finiteness of entry 0); ``data['fps']`` is a list of floats; in ``train``
        and ``val`` mode also ``boundary`` (B, M, 2) seconds (+inf rows), ``saliency`` (B, T) and
        ``pos_clip`` (B, 1). The caller's tensors are not modified.

        Returns:
            ``train``: ``{loss_*}``; ``val``: losses and ``_out``; ``test``: ``{'_out': {'saliency' (T,),
            'boundary' (≤ max_num_moment, 3)}}`` (``boundary`` only with a coord head; B must be 1).
        """
        if mode not in ("train", "val", "test"):
            raise ValueError(f"mode must be train, val or test, got {mode!r}")
        video, video_mask = _split_padding(data["video"])
        query, query_mask = _split_padding(data["query"])
        (batch, frames), tokens = video.shape[:2], query.size(1)
        dims = self.token_dims
        video = video.view(batch, frames, -1, dims.video_tokens, dims.video_width)
        query = query.view(batch, tokens, -1, dims.text_width)
        fps = torch.as_tensor(data["fps"], dtype=torch.float32, device=video.device).reshape(batch)
        targets = None
        if mode != "test":
            targets = Targets(
                saliency=data["saliency"],
                pos_clip=data["pos_clip"].reshape(batch),
                fps=fps,
                boundary=data.get("boundary"),
            )
        out = self(video, video_mask, query, query_mask, targets=targets)
        result: dict[str, Any] = dict(out.losses or {})
        if mode != "train":
            if batch != 1:
                raise ValueError(f"{mode} mode decodes one sample at a time, got a batch of {batch}")
            windows, saliency = decode_sample(
                out, 0, float(fps[0]), self.cfg.max_num_moment, self.cfg.merge_cls_sal
            )
            result["_out"] = (
                {"saliency": saliency} if windows is None else {"saliency": saliency, "boundary": windows}
            )
        return result


def _split_padding(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, F) padded with non-finite rows -> (copy with non-finite entries zeroed, mask (B, T) bool)."""
    finite = x.isfinite()
    return torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)), finite[:, :, 0]


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
