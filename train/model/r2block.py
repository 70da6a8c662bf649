"""The R² block: query-conditioned, recurrent fusion of the last k CLIP layers, latest to earliest."""

from __future__ import annotations

import math

import torch
from torch import nn

from train.model.decoder import TransformerDecoderLayer
from train.model.positional import PositionalEncoding


def token_mlp(in_dims: int, dims: int, dropout: float) -> nn.Sequential:
    """``LN -> Dropout -> Linear -> ReLU -> LN -> Dropout -> Linear``: maps CLIP tokens to width D."""
    return nn.Sequential(
        nn.LayerNorm(in_dims),
        nn.Dropout(dropout),
        nn.Linear(in_dims, dims),
        nn.ReLU(),
        nn.LayerNorm(dims),
        nn.Dropout(dropout),
        nn.Linear(dims, dims),
    )


def temporal_endpoint_feature(length: int, device: torch.device) -> torch.Tensor:
    """TEF of each frame: ``[t / T, (t + 1) / T]`` for ``t = 0..T-1`` (T = padded length) -> (T, 2)."""
    start = torch.arange(length, dtype=torch.float32, device=device) / length
    return torch.stack((start, start + 1.0 / length), dim=-1)


class R2Block(nn.Module):
    """Reversed recurrent refinement over CLIP layers ``i = k-1, ..., 0`` (deepest first).

    For layer ``i`` with visual tokens ``V_i`` (B, T, P, C) and query tokens ``Q_i`` (B, L, Cq)::

        v_i = video_map([V_i, TEF])                   (B, T, P, D)  shared MLP for all layers
        q_i = query_map(Q_i)                          (B, L, D)
        A   = softmax_P(q_map(q_i) · v_map(v_i)ᵀ / √D)     (B, T, L, P)  query-to-patch attention
        o   = max_L(A · v_i + q_i)                    (B, T, D)     query-modulated spatial pooling
        x_i = v_i[CLS] + tanh(scale_i) · o            (B, T, D)
        x_i = σ(gate_i) · x_i + (1 - σ(gate_i)) · h_{i+1}     for i < k-1 (recurrent fusion)
        h_i = Decoder(x_i, mem = q_i, pe = PE(T))     (B, T, D)     temporal refinement

    The output is ``h_0``. As in the reference, the spatial pooling uses no patch or query mask
    (the max over L includes padded query tokens, which are zero vectors before ``query_map``).

    Args:
        video_width: C. text_width: Cq. dims: D. layers: k. use_tef: append the TEF (C + 2 inputs).
        dropout: dropout of the token MLPs. heads, ffn_ratio, droppath: decoder layer settings.
    """

    def __init__(
        self,
        video_width: int,
        text_width: int,
        dims: int = 256,
        layers: int = 4,
        use_tef: bool = True,
        dropout: float = 0.5,
        heads: int = 8,
        ffn_ratio: int = 4,
        droppath: float = 0.1,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.use_tef = use_tef
        self.video_map = token_mlp(video_width + 2 * use_tef, dims, dropout)
        self.query_map = token_mlp(text_width, dims, dropout)
        self.gate = nn.Parameter(torch.zeros(layers - 1))
        self.v_map = nn.Linear(dims, dims)
        self.q_map = nn.Linear(dims, dims)
        self.scale = nn.Parameter(torch.zeros(layers))
        self.pos = PositionalEncoding(dims)
        self.tem = TransformerDecoderLayer(dims, heads, ffn_ratio, droppath)

    def forward(
        self,
        video: torch.Tensor,
        query: torch.Tensor,
        video_mask: torch.Tensor,
        query_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Fuse the last k layers of ``video`` (B, T, N, P, C) and ``query`` (B, L, N, Cq), N >= k.

        ``video_mask`` (B, T), ``query_mask`` (B, L): bool, True = valid.

        Returns:
            h_0 (B, T, D); q_0 (B, L, D) (query tokens of the earliest fused layer);
            coll_v: k tensors (B, T, D), the CLS token of ``v_i``; coll_q: k tensors (B, L, D), ``q_i``;
            both lists ordered ``i = k-1, ..., 0``.
        """
        batch, length = video.shape[:2]
        video, query = video[:, :, -self.layers :], query[:, :, -self.layers :]
        if self.use_tef:
            tef = temporal_endpoint_feature(length, video.device).to(video.dtype)
            tef = tef[None, :, None, None, :].expand(batch, -1, video.size(2), video.size(3), -1)
            video = torch.cat((video, tef), dim=-1)
        pe = self.pos(video)
        coll_v: list[torch.Tensor] = []
        coll_q: list[torch.Tensor] = []
        hidden: torch.Tensor | None = None
        for i in reversed(range(self.layers)):
            v_i = self.video_map(video[:, :, i])  # (B, T, P, D)
            q_i = self.query_map(query[:, :, i])  # (B, L, D)
            coll_v.append(v_i[:, :, 0])
            coll_q.append(q_i)
            x = v_i[:, :, 0] + self.pool(v_i, q_i) * self.scale[i].tanh()
            if hidden is not None:
                gate = self.gate[i].sigmoid()
                x = gate * x + (1 - gate) * hidden
            hidden = self.tem(x, q_i, pe, video_mask, query_mask)
        assert hidden is not None  # layers >= 1
        return hidden, q_i, coll_v, coll_q

    def pool(self, v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Query-modulated spatial pooling: ``v`` (B, T, P, D), ``q`` (B, L, D) -> (B, T, D)."""
        scores = self.q_map(q)[:, None] @ self.v_map(v).transpose(-2, -1)  # (B, T, L, P)
        att = (scores / math.sqrt(v.size(-1))).softmax(dim=-1)
        return (att @ v + q[:, None]).amax(dim=2)
