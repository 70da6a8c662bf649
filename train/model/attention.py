"""Multi-head attention with separate q/k/v/output projections (nncore layout: ``q``, ``k``, ``v``, ``m``)."""

from __future__ import annotations

import math

import torch
from torch import nn


class MultiHeadAttention(nn.Module):
    """``softmax(q kᵀ / sqrt(D/H) + key_mask) v`` over H heads, then the output projection ``m``.

    Weights are initialised xavier-uniform, biases zero (R2_SPEC §5).

    Args:
        dims: D, model width.
        heads: H, number of heads (D divisible by H).
    """

    def __init__(self, dims: int, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.head_dims = dims // heads
        self.q = nn.Linear(dims, dims)
        self.k = nn.Linear(dims, dims)
        self.v = nn.Linear(dims, dims)
        self.m = nn.Linear(dims, dims)
        for layer in (self.q, self.k, self.v, self.m):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend ``q`` (B, Tq, D) to ``k``/``v`` (B, Tk, D); ``key_mask`` (B, Tk) bool, True = valid.

        Returns (B, Tq, D).
        """
        batch, tq, dims = q.shape
        q = self._split(self.q(q))  # (B, H, Tq, d)
        k = self._split(self.k(k))
        v = self._split(self.v(v))
        att = q @ k.transpose(-2, -1) / math.sqrt(self.head_dims)  # (B, H, Tq, Tk)
        if key_mask is not None:
            att = att.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        out = att.softmax(dim=-1) @ v  # (B, H, Tq, d)
        return self.m(out.transpose(1, 2).reshape(batch, tq, dims))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, H, T, D/H)."""
        return x.view(x.size(0), x.size(1), self.heads, self.head_dims).transpose(1, 2)
