"""Optimizer, learning-rate schedule and gradient clipping of the reference recipe.

AdamW (weight decay 1e-4 on every trainable parameter, no parameter groups), a step policy evaluated
per epoch (``lr = base * gamma ** #milestones passed``, epoch index 0-based) and a linear warm-up
counted in optimizer iterations that overrides the epoch rate while active::

    lr = base * ((ratio - 1) * (1 - it / warmup_iters) + 1)      for it < warmup_iters

The schedule is a pure function of ``(epoch, iteration)``, so resuming needs no scheduler state
beyond those two counters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LrSchedule:
    """Step decay per epoch plus linear warm-up per iteration.

    Attributes:
        base_lr: peak learning rate.
        milestones: 0-based epochs at which the rate is multiplied by ``gamma`` (cumulative).
        gamma: decay factor per milestone.
        warmup_iters: number of warm-up iterations (0 disables warm-up).
        warmup_ratio: rate at iteration 0 as a fraction of ``base_lr``.
    """

    base_lr: float
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_ratio: float = 0.001

    def lr_at(self, epoch: int, iteration: int) -> float:
        """Learning rate for the optimizer step taken at 0-based ``epoch`` and global ``iteration``."""
        if iteration < self.warmup_iters:
            progress = 1.0 - iteration / self.warmup_iters
            return self.base_lr * ((self.warmup_ratio - 1.0) * progress + 1.0)
        passed = sum(1 for m in self.milestones if epoch >= m)
        return self.base_lr * self.gamma**passed

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, iteration: int) -> float:
        """Set the rate of every parameter group of ``optimizer``; returns the rate set."""
        lr = self.lr_at(epoch, iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


def build_optimizer(
    params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 1e-4
) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients (torch default betas and eps)."""
    trainable = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip the global L2 gradient norm to ``max_norm`` (``None`` or <= 0: no clipping).

    Returns the total norm before clipping (``nan``/``inf`` when a gradient overflowed).
    """
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm is None or max_norm <= 0:
        norms = torch.stack([p.grad.detach().float().norm(2) for p in grads if p.grad is not None])
        return float(norms.norm(2))
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm=max_norm, norm_type=2))
