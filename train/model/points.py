"""Anchor points of the pyramid levels (time unit: clips)."""

from __future__ import annotations

import torch


class PointGenerator:
    """One point per pyramid step: ``[t = j * s, reg_min, reg_max, s]``.

    Regression ranges partition the distances by level: level ``l`` accepts a maximal distance in
    ``[s_l, s_{l+1}]`` (``0`` for the first level, ``inf`` for the last); strides (1, 2, 4, 8) give
    (0, 2), (2, 4), (4, 8), (8, inf). Points sit at the left edge of their step (no half-stride offset).
    """

    def __init__(self, strides: tuple[int, ...]) -> None:
        self.strides = tuple(strides)
        bounds = [0.0, *map(float, self.strides[1:]), float("inf")]
        self.ranges = list(zip(bounds[:-1], bounds[1:], strict=True))

    def __call__(self, sizes: list[int], device: torch.device | None = None) -> torch.Tensor:
        """Points of levels with ``sizes[l]`` steps -> (Σ T_l, 4) float32, made on ``device`` (no copy of
        host data, which would make the host wait for the device)."""
        rows = []
        for size, s, (lo, hi) in zip(sizes, self.strides, self.ranges, strict=False):
            t = torch.arange(size, dtype=torch.float32, device=device) * s
            rest = [t.new_full((size,), value) for value in (lo, hi, float(s))]
            rows.append(torch.stack((t, *rest), dim=1))
        return torch.cat(rows)
