"""One model's training state and optimizer step, apart from any loop.

:func:`build_state` makes model + AdamW + schedule (+ GradScaler on CUDA) from a :class:`RunConfig`;
:func:`train_step` takes one optimizer step on prepared :class:`~train.data.batching.ModelInputs`. The
loop in :mod:`train.engine.trainer` and the sweep's shared data pass (several models fed by one read of
the data) both drive these. :func:`state_meta` / :func:`load_state_meta` turn the optimizer, scaler
and counters into checkpoint data and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from train.config import RunConfig
from train.data.batching import ModelInputs
from train.engine.schedule import LrSchedule, build_optimizer, clip_gradients
from train.model import R2Tuning


@dataclass
class TrainState:
    """Everything one model needs to take optimizer steps.

    Attributes:
        cfg: the run configuration.
        model: the R² model (on ``device``).
        optimizer: AdamW over its trainable parameters.
        schedule: learning-rate schedule.
        scaler: fp16 gradient scaler (CUDA with ``cfg.train.amp`` only), else ``None``.
        device: where the model lives.
        epoch: 0-based epoch the next step belongs to (= epochs completed).
        iteration: optimizer steps taken so far (counts warm-up).
    """

    cfg: RunConfig
    model: R2Tuning
    optimizer: torch.optim.AdamW
    schedule: LrSchedule
    scaler: torch.amp.GradScaler | None
    device: torch.device
    epoch: int = 0
    iteration: int = 0

    @property
    def amp(self) -> bool:
        """Whether steps run under fp16 autocast."""
        return self.scaler is not None


def build_state(cfg: RunConfig, device: torch.device | str = "cpu", seed: int | None = None) -> TrainState:
    """Model, optimizer, schedule and scaler for ``cfg`` on ``device``.

    The model's initial weights depend only on ``seed`` (default ``cfg.train.seed``): the global
    torch generator is seeded right before the model is built.
    """
    device = torch.device(device)
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    model = R2Tuning(cfg.model, cfg.loss).to(device)
    o = cfg.optim
    optimizer = build_optimizer(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    schedule = LrSchedule(
        base_lr=o.lr,
        milestones=tuple(o.lr_steps),
        gamma=o.lr_gamma,
        warmup_iters=o.warmup_iters,
        warmup_ratio=o.warmup_ratio,
    )
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.train.amp else None
    return TrainState(cfg, model, optimizer, schedule, scaler, device)


def forward_losses(state: TrainState, inputs: ModelInputs) -> dict[str, torch.Tensor]:
    """Weighted losses of ``inputs`` (with targets) in the model's current mode, under fp16 autocast
    when the state uses AMP (the model keeps heads and losses in fp32)."""
    if inputs.targets is None:
        raise ValueError("forward_losses needs inputs built with targets")
    with torch.autocast(state.device.type, dtype=torch.float16, enabled=state.amp):
        out = state.model(
            inputs.video, inputs.video_mask, inputs.query, inputs.query_mask, targets=inputs.targets
        )
    return dict(out.losses or {})


def train_step(state: TrainState, inputs: ModelInputs) -> dict[str, float]:
    """One optimizer step on ``inputs``: set the rate, forward, backward, clip, step.

    With AMP the GradScaler skips steps whose gradients overflowed; without it a step whose
    gradient norm is not finite is skipped as well (weights stay finite). The iteration counter
    advances either way, as the reference's does.

    Returns:
        the weighted losses, their sum ``loss``, the ``lr`` used, ``grad_norm`` (before clipping)
        and ``skipped`` (1.0 when the step was not applied).
    """
    model, optimizer = state.model, state.optimizer
    model.train()
    lr = state.schedule.apply(optimizer, state.epoch, state.iteration)
    optimizer.zero_grad(set_to_none=True)
    losses = forward_losses(state, inputs)
    total = torch.stack(list(losses.values())).sum()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if state.scaler is not None:
        state.scaler.scale(total).backward()
        state.scaler.unscale_(optimizer)
        norm = clip_gradients(params, state.cfg.optim.grad_clip)
        scale_before = state.scaler.get_scale()
        state.scaler.step(optimizer)
        state.scaler.update()
        skipped = state.scaler.get_scale() < scale_before
    else:
        total.backward()
        norm = clip_gradients(params, state.cfg.optim.grad_clip)
        skipped = not math.isfinite(norm)
        if not skipped:
            optimizer.step()
    state.iteration += 1
    result = {name: float(value.detach()) for name, value in losses.items()}
    result.update(loss=float(total.detach()), lr=lr, grad_norm=norm, skipped=float(skipped))
    return result


def state_meta(state: TrainState) -> dict[str, Any]:
    """Optimizer, scaler and counters as checkpoint data (tensors and plain values)."""
    return {
        "epoch": state.epoch,
        "iteration": state.iteration,
        "optimizer": state.optimizer.state_dict(),
        "scaler": None if state.scaler is None else state.scaler.state_dict(),
    }


def load_state_meta(state: TrainState, meta: dict[str, Any]) -> None:
    """Restore what :func:`state_meta` saved (optimizer tensors are moved to the state's device).

    Raises:
        ValueError: ``meta`` lacks the optimizer or counters.
    """
    missing = [k for k in ("epoch", "iteration", "optimizer") if k not in meta]
    if missing:
        raise ValueError(f"training state lacks {', '.join(missing)}")
    optim_state = meta["optimizer"]
    for group in optim_state.get("param_groups", []):
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    state.optimizer.load_state_dict(optim_state)
    if state.scaler is not None and meta.get("scaler"):
        state.scaler.load_state_dict(meta["scaler"])
    state.epoch = int(meta["epoch"])
    state.iteration = int(meta["iteration"])
