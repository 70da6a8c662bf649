"""Optimizer, learning-rate schedule and gradient clipping of the reference recipe, and the warm-up check.

AdamW (weight decay 1e-4 on every trainable parameter, no parameter groups), a step policy evaluated
per epoch (``lr = base * gamma ** #milestones passed``, epoch index 0-based) and a linear warm-up
counted in optimizer iterations that overrides the epoch rate while active::

    lr = base * ((ratio - 1) * (1 - it / warmup_iters) + 1)      for it < warmup_iters

The schedule is a pure function of ``(epoch, iteration)``, so resuming needs no scheduler state
beyond those two counters.

:func:`warn_short_warmup` logs one warning line when a run (``r2 train``) or some trials of a sweep
(``r2 sweep``, once at plan time: :func:`warn_sweep_warmup`) take no more optimizer steps than the warm-up
lasts: such a run never leaves the warm-up and never trains at the configured rate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from train.config import RunConfig, apply_overrides, get_preset

log = logging.getLogger(__name__)


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
    params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 1e-4, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients (torch default betas and eps).

    ``fused``: the fused implementation (same math, one kernel; the CUDA path, whose steps a GradScaler
    or a non-finite gradient norm skips on the device), else torch's default (for-each on the CPU).
    """
    trainable = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, fused=fused or None)


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Clip the global L2 gradient norm to ``max_norm`` (``None`` or <= 0: no clipping).

    Returns the total norm before clipping, a 0-dim float32 tensor on the gradients' device (``nan``/``inf``
    when a gradient overflowed; 0 when no parameter has a gradient), computed without a host read.
    """
    params = list(params)
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros((), device=params[0].device if params else None)
    if max_norm is None or max_norm <= 0:
        return torch.stack([p.grad.detach().float().norm(2) for p in with_grad if p.grad is not None]).norm(2)
    return torch.nn.utils.clip_grad_norm_(with_grad, max_norm=max_norm, norm_type=2)


def steps_per_epoch(queries: int, cfg: RunConfig) -> int:
    """Optimizer steps of one epoch over ``queries`` training queries:
    ``ceil(queries x train.repeat / train.batch_size)``."""
    return math.ceil(queries * cfg.train.repeat / cfg.train.batch_size)


def warmup_warning(cfg: RunConfig, epoch_steps: int) -> str | None:
    """The warning for a run of ``cfg`` with ``epoch_steps`` optimizer steps per epoch whose every step is
    a warm-up step (``train.epochs x epoch_steps <= optim.warmup_iters``), else ``None``.

    The message gives the step counts, the peak rate (that of the last step, as a percentage of
    ``optim.lr``) and the two fixes: a shorter warm-up or more epochs.
    """
    warmup = cfg.optim.warmup_iters
    total = cfg.train.epochs * epoch_steps
    if warmup <= 0 or total <= 0 or total > warmup:
        return None
    schedule = LrSchedule(cfg.optim.lr, warmup_iters=warmup, warmup_ratio=cfg.optim.warmup_ratio)
    peak = schedule.lr_at(cfg.train.epochs - 1, total - 1) / cfg.optim.lr
    epochs = f"{cfg.train.epochs} epoch{'s' * (cfg.train.epochs != 1)}"
    steps = f"{epoch_steps} step{'s' * (epoch_steps != 1)}"
    return (
        f"the run never leaves the learning-rate warm-up: {epochs} x {steps} = {total} optimizer steps "
        f"<= optim.warmup_iters={warmup}, so the rate peaks at {100 * peak:.1f} % "
        f"of lr={cfg.optim.lr:g}; shorten the warm-up (--set warmup=N with N < {total}) or train more "
        f"epochs (--set epochs=N with N > {warmup // epoch_steps})"
    )


def warn_short_warmup(runs: Sequence[tuple[RunConfig, int]], noun: str = "trials") -> str | None:
    """Log one warning line (logger ``train.engine.schedule``) when some of ``runs`` (config, optimizer
    steps per epoch) never leave the warm-up (:func:`warmup_warning`): the message of the first such run,
    prefixed with ``"k of n <noun>: "`` when there are several runs.

    Returns:
        the line logged, or ``None`` when every run leaves the warm-up.
    """
    messages = [m for m in (warmup_warning(cfg, steps) for cfg, steps in runs) if m is not None]
    if not messages:
        return None
    line = messages[0] if len(runs) == 1 else f"{len(messages)} of {len(runs)} {noun}: {messages[0]}"
    log.warning("%s", line)
    return line


def warn_sweep_warmup(preset: str, store: str | Path, trials: Sequence[Sequence[str]]) -> str | None:
    """:func:`warn_short_warmup` for the trials of a sweep, once at plan time: each trial's config is
    ``preset`` with its overrides (``["key=value", ...]``), its steps per epoch come from the trainable
    queries of its training split in ``store`` (:func:`train.engine.rundata.trainable_queries`).

    Raises:
        ConfigError: a bad override. StoreError: an unreadable store.
    """
    from shards.store import open_store
    from train.engine.rundata import trainable_queries  # rundata imports this module (via step)

    handle = open_store(store)
    queries: dict[str, int] = {}
    runs = []
    for overrides in trials:
        cfg = apply_overrides(get_preset(preset), list(overrides))
        split = cfg.train.train_split
        if split not in queries:
            queries[split] = len(trainable_queries(handle, cfg, split))
        runs.append((cfg, steps_per_epoch(queries[split], cfg)))
    return warn_short_warmup(runs)
