"""One model's training state and optimizer step, apart from any loop.

:func:`build_state` makes model + AdamW + schedule (+ GradScaler) from a :class:`RunConfig`;
:func:`train_step` takes one optimizer step on prepared :class:`~train.data.batching.ModelInputs`. The
loop in :mod:`train.engine.trainer` and the sweep's shared data pass (several models fed by one read of
the data) both drive these. :func:`state_meta` / :func:`load_state_meta` turn the optimizer, scaler
and counters into checkpoint data and back.

On CUDA a step never waits on the host: it returns its values (losses, gradient norm, skipped flag) as
device tensors, the optimizer is fused AdamW, which the GradScaler (or a non-finite gradient norm
without one) skips on the device, and :func:`read_step_values` reads the values of many steps in one
transfer (the loop does so every ``train.log_every`` steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from train.config import RunConfig
from train.data.batching import ModelInputs
from train.engine.rng import set_deterministic
from train.engine.schedule import LrSchedule, build_optimizer, clip_gradients
from train.model import R2Tuning

StepValues = dict[str, torch.Tensor | float]
"""What :func:`train_step` returns: 0-dim tensors on the training device (losses, ``grad_norm``,
``skipped``) and the host float ``lr``."""


@dataclass
class TrainState:
    """Everything one model needs to take optimizer steps.

    Attributes:
        cfg: the run configuration.
        model: the R² model (on ``device``).
        optimizer: AdamW over its trainable parameters (fused on the CUDA path, see :func:`build_state`).
        schedule: learning-rate schedule.
        scaler: fp16 gradient scaler (CUDA path with ``cfg.train.amp`` only), else ``None``.
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

    @property
    def fused(self) -> bool:
        """Whether the optimizer is fused AdamW, whose steps are skipped on the device (the CUDA path)."""
        return bool(self.optimizer.defaults.get("fused"))


def build_state(
    cfg: RunConfig, device: torch.device | str = "cpu", seed: int | None = None, cuda_path: bool | None = None
) -> TrainState:
    """Model, optimizer, schedule and scaler for ``cfg`` on ``device``.

    The model's initial weights depend only on ``seed`` (default ``cfg.train.seed``): the global
    torch generator is seeded right before the model is built. ``train.deterministic`` sets the
    deterministic flags first (:func:`train.engine.rng.set_deterministic`); ``train.compile`` compiles
    the model in place (``nn.Module.compile``: same module, same state-dict keys).

    Args:
        cuda_path: take steps that never wait on the host: fused AdamW and, with ``train.amp``, an fp16
            GradScaler on ``device``. Default: on CUDA only (the CPU keeps the for-each AdamW and reads
            the gradient norm, which costs nothing there); tests pass ``True`` to run the CUDA step on
            the CPU.
    """
    device = torch.device(device)
    cuda_path = device.type == "cuda" if cuda_path is None else cuda_path
    set_deterministic(cfg.train.deterministic)
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    model = R2Tuning(cfg.model, cfg.loss).to(device)
    if cfg.train.compile:
        model.compile()
    o = cfg.optim
    optimizer = build_optimizer(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, fused=cuda_path)
    schedule = LrSchedule(
        base_lr=o.lr,
        milestones=tuple(o.lr_steps),
        gamma=o.lr_gamma,
        warmup_iters=o.warmup_iters,
        warmup_ratio=o.warmup_ratio,
    )
    scaler = torch.amp.GradScaler(device.type) if cuda_path and cfg.train.amp else None
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


def train_step(state: TrainState, inputs: ModelInputs) -> StepValues:
    """One optimizer step on ``inputs``: set the rate, forward, backward, clip, step.

    With AMP the GradScaler skips steps whose gradients overflowed; without it a step whose
    gradient norm is not finite is skipped as well (weights stay finite). The iteration counter
    advances either way, as the reference's does. On the CUDA path (:attr:`TrainState.fused`) both
    skips happen on the device and nothing waits on the host; otherwise (the CPU) the gradient norm
    is read to decide the skip.

    Returns:
        0-dim tensors on the device: the weighted losses, their sum ``loss``, ``grad_norm`` (before
        clipping) and ``skipped`` (true when the step was not applied); and the host float ``lr`` used
        (:func:`read_step_values` turns results into floats).
    """
    model, optimizer = state.model, state.optimizer
    model.train()
    lr = state.schedule.apply(optimizer, state.epoch, state.iteration)
    optimizer.zero_grad(set_to_none=True)
    losses = forward_losses(state, inputs)
    total = torch.stack(list(losses.values())).sum()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if state.scaler is not None:
        scaler = state.scaler
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
        norm = clip_gradients(params, state.cfg.optim.grad_clip)
        scale_before = _scale(scaler).clone()
        scaler.step(optimizer)
        scaler.update()
        skipped = _scale(scaler) < scale_before  # the scaler backs off exactly when it skips
    else:
        total.backward()
        norm = clip_gradients(params, state.cfg.optim.grad_clip)
        skipped = ~torch.isfinite(norm)
        if state.fused:
            _step_unless(optimizer, skipped)
        elif not bool(skipped):
            optimizer.step()
    state.iteration += 1
    result: StepValues = {name: value.detach() for name, value in losses.items()}
    result.update(loss=total.detach(), lr=lr, grad_norm=norm.detach(), skipped=skipped)
    return result


def _scale(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The scaler's current scale as a 0-dim device tensor (``get_scale()`` would read it to the host)."""
    scale = scaler._get_scale_async()
    if scale is None:
        raise RuntimeError("the GradScaler has no scale before its first scale()")
    return scale


def _step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """Step the fused ``optimizer`` unless the 0-dim bool tensor ``skip`` is true, decided on the device
    (the ``found_inf`` a GradScaler hands a fused optimizer; a skipped step leaves weights and moments
    unchanged and does not count in the optimizer's step counter)."""
    setattr(optimizer, "found_inf", skip.float())  # noqa: B010 (the optimizer reads it with getattr)
    try:
        optimizer.step()
    finally:
        delattr(optimizer, "found_inf")


def read_step_values(steps: list[StepValues]) -> list[dict[str, float]]:
    """The values of :func:`train_step` results as floats, read from the device in one transfer (the
    only point where the host waits for the steps); plain floats pass through unchanged."""
    tensors = [v.detach().float() for out in steps for v in out.values() if isinstance(v, torch.Tensor)]
    host = iter(torch.stack(tensors).tolist() if tensors else [])
    return [
        {name: next(host) if isinstance(value, torch.Tensor) else float(value) for name, value in out.items()}
        for out in steps
    ]


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

    The optimizer keeps its own implementation (fused or for-each): a checkpoint of a CPU run resumes
    on the CUDA path and the other way round.

    Raises:
        ValueError: ``meta`` lacks the optimizer or counters.
    """
    missing = [k for k in ("epoch", "iteration", "optimizer") if k not in meta]
    if missing:
        raise ValueError(f"training state lacks {', '.join(missing)}")
    optim_state = meta["optimizer"]
    for group, own in zip(optim_state.get("param_groups", []), state.optimizer.param_groups, strict=False):
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        group.update({key: own[key] for key in ("fused", "foreach", "capturable") if key in own})
    state.optimizer.load_state_dict(optim_state)
    if state.scaler is not None and meta.get("scaler"):
        state.scaler.load_state_dict(meta["scaler"])
    state.epoch = int(meta["epoch"])
    state.iteration = int(meta["iteration"])
