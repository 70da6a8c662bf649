"""Prediction heads shared across pyramid levels, and attentive pooling of the query tokens."""

from __future__ import annotations

import torch
from torch import nn

from train.model.layers import Transpose


class ConvHead(nn.Module):
    """``Conv1d(D, D, 3) -> ReLU -> Conv1d(D, out, 3)`` along time (padding 1): (B, T, D) -> (B, T, out)."""

    def __init__(self, dims: int, out_dims: int, kernel_size: int = 3) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.module = nn.Sequential(
            Transpose(),
            nn.Conv1d(dims, dims, kernel_size, padding=pad),
            nn.ReLU(),
            nn.Conv1d(dims, out_dims, kernel_size, padding=pad),
            Transpose(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class AdaPooling(nn.Module):
    """Attentive pooling over tokens: ``a = softmax_L(w · x_l)`` over valid tokens, ``Σ_l a_l x_l``."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.att = nn.Linear(dims, 1, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L, D), ``mask`` (B, L) bool, True = valid -> (B, D)."""
        logits = self.att(x)[..., 0].masked_fill(~mask, float("-inf"))
        return (logits.softmax(dim=-1)[..., None] * x).sum(dim=1)
