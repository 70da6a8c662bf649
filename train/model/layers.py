"""Parameter-free helper layers."""

from __future__ import annotations

import torch
from torch import nn


class Transpose(nn.Module):
    """Swap the time and channel axes: (B, T, D) <-> (B, D, T), so Conv1d runs along time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)
