"""Fixed sinusoidal positional encoding of the temporal decoder (nncore ``PositionalEncoding``)."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionalEncoding(nn.Module):
    """Normalised, interleaved sin/cos encoding of frame positions (no parameters).

    For position ``t = 1..T`` (``T`` = padded length, the mask is ignored as in the reference)::

        pos_t = t / (T + 1e-6) * 2π
        PE[t, 2i]   = sin(pos_t / 10000^(2i / D))
        PE[t, 2i+1] = cos(pos_t / 10000^(2i / D))

    Args:
        dims: D, encoding width (even).
        temperature: base of the frequency progression.
    """

    def __init__(self, dims: int, temperature: float = 10000.0) -> None:
        super().__init__()
        self.dims = dims
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, *) -> encoding (B, T, D) on ``x``'s device, fp32."""
        batch, length = x.shape[:2]
        pos = torch.arange(1, length + 1, dtype=torch.float32, device=x.device)
        pos = pos / (length + 1e-6) * (2 * math.pi)
        dim_t = torch.arange(self.dims, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.dims)
        angles = pos[:, None] / dim_t  # (T, D)
        pe = torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=-1).flatten(1)
        return pe.unsqueeze(0).expand(batch, -1, -1)
