"""Temporal conv pyramid over the R²-block output."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from train.model.layers import Transpose


def downsample_block(dims: int, times: int) -> nn.Sequential:
    """``times`` x [Conv1d(D, D, kernel 2, stride 2) along time, LN, ReLU]: divides T by 2**times."""
    layers: list[nn.Module] = []
    for _ in range(times):
        layers += [
            Transpose(),
            nn.Conv1d(dims, dims, 2, stride=2),
            Transpose(),
            nn.LayerNorm(dims),
            nn.ReLU(),
        ]
    return nn.Sequential(*layers)


class ConvPyramid(nn.Module):
    """Feature pyramid with one level per stride ``s`` (powers of two, first = 1).

    Level ``s = 1`` is ``ReLU(x)``; level ``s = 2^p`` applies ``p`` stride-2 convs to ``ReLU(x)``
    (independent weights per level), giving ``floor(T / s)`` steps. Levels with ``T < s`` are skipped.
    Level masks: a step is valid if any frame it covers is valid (max-pool of the frame mask).

    In the reference the stride-1 ReLU is applied *in place*, so the R²-block output itself becomes
    ``ReLU(x)`` for every later use; :class:`train.model.r2tuning.R2Tuning` uses level 0 for that.
    """

    def __init__(self, dims: int, strides: tuple[int, ...] = (1, 2, 4, 8)) -> None:
        super().__init__()
        if strides[0] != 1:
            raise ValueError(f"the first pyramid stride must be 1, got {strides}")
        self.strides = tuple(strides)
        self.blocks = nn.ModuleList([nn.ReLU()])
        self.blocks.extend(downsample_block(dims, int(math.log2(s))) for s in self.strides[1:])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``x`` (B, T, D), ``mask`` (B, T) bool -> levels [(B, T_l, D)], masks [(B, T_l) bool]."""
        base = self.blocks[0](x)
        levels, masks = [base], [mask]
        for s, block in zip(self.strides[1:], self.blocks[1:], strict=True):
            if x.size(1) < s:
                break
            levels.append(block(base))
            masks.append(F.max_pool1d(mask[:, None].float(), s, s)[:, 0] > 0)
        return levels, masks
