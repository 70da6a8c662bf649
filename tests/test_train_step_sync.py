"""The CUDA training step, run on the CPU: no host read of a device value between two log reads, the
GradScaler's and the fused optimizer's skips decided on the device, values read later that count the
same, resume after an overflow."""

from __future__ import annotations

import dataclasses
import io
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers.fixtures import TINY_STEP_OVERRIDES, TINY_STEP_SPEC, synthetic_store_fixture
from tests.helpers.synthetic import synthetic_run_config
from train.config import RunConfig
from train.data.batching import ModelInputs
from train.engine.loop import NONFINITE_STEPS, Member, NonFiniteLossError
from train.engine.records import Best
from train.engine.rng import capture_rng, restore_rng
from train.engine.rundata import epoch_inputs, open_run_data
from train.engine.runlog import RunPaths
from train.engine.step import (
    TrainState,
    build_state,
    load_state_meta,
    read_step_values,
    state_meta,
    train_step,
)
from train.model.losses import L1Loss

SPEC = TINY_STEP_SPEC
OVERRIDES = [*TINY_STEP_OVERRIDES, "epochs=1"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

store = synthetic_store_fixture(SPEC)

_VALUE_READS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal"}
_SIZE_FROM_VALUES = {"aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2"}


class HostSyncs(TorchDispatchMode):
    """Counts the ops that make the host wait for the device on CUDA.

    ``reads``: reads of a device value (``float(t)``, ``bool(t)``) and ops whose output size depends on
    the values (``nonzero``, a boolean-mask index). ``host_tensors``: tensors made of host data
    (``torch.tensor(...)``, ``torch.from_numpy``): inside the step, where every tensor belongs on the
    device, each is a blocking copy on CUDA.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self.host_tensors = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func.overloadpacket)
        bool_index = name in ("aten.index", "aten.index_put") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        )
        if name in _VALUE_READS | _SIZE_FROM_VALUES or bool_index:
            self.reads[name] += 1
        self.host_tensors += name == "aten.lift_fresh"
        return func(*args, **(kwargs or {}))


def _cfg(*extra: str) -> RunConfig:
    return synthetic_run_config(SPEC, "tacos", [*OVERRIDES, *extra])


def _batches(store: Path, cfg: RunConfig, count: int) -> list[ModelInputs]:
    """The first ``count`` training inputs of ``cfg`` on the CPU (epochs repeat the data when short)."""
    cfg, data = open_run_data(cfg, store, "cpu")
    batches: list[ModelInputs] = []
    epoch = 0
    while len(batches) < count:
        batches += [inputs for inputs, _ in epoch_inputs(data.loader, cfg, data.spec, data.device, epoch)]
        epoch += 1
    return batches[:count]


def _member(state: TrainState, tmp_path: Path, log_every: int) -> Member:
    return Member(state, RunPaths(tmp_path), Best("R1@0.5"), capture_rng(state.device), log_every=log_every)


def _weights(state: TrainState) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in state.model.named_parameters()}


def _overflow(state: TrainState) -> torch.utils.hooks.RemovableHandle:
    """Make the next backward give one parameter an infinite gradient."""
    param = next(p for p in state.model.parameters() if p.requires_grad)
    return param.register_hook(lambda grad: torch.full_like(grad, float("inf")))


def _round_trip(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` through ``torch.save`` and a ``weights_only`` load, as a checkpoint holds it."""
    buffer = io.BytesIO()
    torch.save(meta, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_cuda_path_steps_never_read_the_device_between_log_reads(store, tmp_path):
    cfg = _cfg("train.amp=true", "train.log_every=4")
    state = build_state(cfg, "cpu", cuda_path=True)  # what CUDA runs: fused AdamW, fp16 GradScaler
    assert state.fused and state.amp and state.scaler is not None
    member = _member(state, tmp_path, cfg.train.log_every)
    batches = _batches(store, cfg, 8)
    for read_before, window in enumerate((batches[:4], batches[4:])):
        with HostSyncs() as syncs:
            for inputs in window[:3]:
                member.step(inputs, len(inputs))
        assert dict(syncs.reads) == {}
        assert len(member.pending) == 3 and member.stats.steps == 4 * read_before
        member.step(window[3], len(window[3]))  # the log read
        assert not member.pending and member.stats.steps == 4 * (read_before + 1)
    assert member.stats.steps == 8 and state.iteration == 8
    assert all(torch.isfinite(torch.tensor(v)) for v in member.stats.totals.values())


@pytest.mark.parametrize("amp", [True, False])
def test_the_cuda_step_makes_no_host_tensor_and_reads_nothing(store, amp):
    cfg = _cfg(f"train.amp={str(amp).lower()}")
    state = build_state(cfg, "cpu", cuda_path=True)
    for inputs in _batches(store, cfg, 2):  # the first step creates the optimizer and scaler states
        with HostSyncs() as syncs:
            train_step(state, inputs)
        assert dict(syncs.reads) == {} and syncs.host_tensors == 0


def test_the_cpu_path_reads_the_gradient_norm_to_skip(store):
    state = build_state(_cfg(), "cpu")
    assert not state.fused and state.scaler is None
    inputs = _batches(store, _cfg(), 1)[0]
    with HostSyncs() as syncs:
        train_step(state, inputs)
    assert syncs.reads["aten._local_scalar_dense"] >= 1  # the norm (and the for-each AdamW's step counts)


@pytest.mark.parametrize("log_every", [3, 10])
def test_values_read_later_count_as_values_read_every_step(store, tmp_path, log_every):
    cfg = _cfg("train.amp=true")
    batches = _batches(store, cfg, 5)
    members = []
    for every, root in ((1, tmp_path / "each"), (log_every, tmp_path / "later")):
        member = _member(build_state(cfg, "cpu", cuda_path=True), root, every)
        for inputs in batches:
            member.step(inputs, len(inputs))
        member.flush()
        members.append(member)
    each, later = members
    assert later.stats == each.stats and later.stats.steps == 5
    for name, weight in _weights(each.state).items():
        assert torch.equal(weight, _weights(later.state)[name])


def test_a_non_finite_streak_fails_at_the_next_read_naming_its_fifth_step(store, tmp_path):
    cfg = _cfg("train.amp=true")
    batches = _batches(store, cfg, NONFINITE_STEPS + 3)
    member = _member(build_state(cfg, "cpu", cuda_path=True), tmp_path, log_every=20)
    member.step(batches[0], len(batches[0]))
    before = _weights(member.state)
    for inputs in batches[1:]:  # a finite step, then NONFINITE_STEPS + 2 steps of NaN tokens
        poisoned = dataclasses.replace(inputs, video=torch.full_like(inputs.video, float("nan")))
        member.step(poisoned, len(poisoned))  # no read yet: nothing raises
    assert len(member.pending) == NONFINITE_STEPS + 3
    after = _weights(member.state)
    assert all(torch.equal(before[n], after[n]) for n in before)  # every NaN step was skipped on the device
    with pytest.raises(NonFiniteLossError) as info:
        member.flush()
    message = str(info.value)
    assert f"{NONFINITE_STEPS} training steps in a row" in message
    assert f"iteration {1 + NONFINITE_STEPS}, epoch 1" in message and "loss nan" in message
    assert member.stats.steps == 1 + NONFINITE_STEPS


def test_gradscaler_skips_an_overflowing_step_on_the_device(store):
    state = build_state(_cfg("train.amp=true"), "cpu", cuda_path=True)
    assert state.scaler is not None
    inputs = _batches(store, state.cfg, 1)[0]
    scale = state.scaler.get_scale()
    before = _weights(state)
    hook = _overflow(state)
    out = train_step(state, inputs)
    hook.remove()
    assert isinstance(out["skipped"], torch.Tensor) and bool(out["skipped"])
    values = read_step_values([out])[0]
    assert values["skipped"] == 1.0 and not math.isfinite(values["grad_norm"])
    assert state.scaler.get_scale() == scale * state.scaler.get_backoff_factor()
    after = _weights(state)
    assert all(torch.equal(before[n], after[n]) for n in before) and state.iteration == 1
    steps = {float(s["step"]) for s in state.optimizer.state.values()}
    assert steps <= {0.0}  # the fused optimizer took the skip back from its step counts

    applied = read_step_values([train_step(state, inputs)])[0]
    assert applied["skipped"] == 0.0 and state.scaler.get_scale() == scale * state.scaler.get_backoff_factor()
    stepped = _weights(state)
    assert any(not torch.equal(before[n], stepped[n]) for n in before)


@pytest.mark.parametrize("cuda_path", [True, False])
def test_a_non_finite_gradient_without_a_scaler_skips_the_step(store, cuda_path):
    state = build_state(_cfg("train.amp=false"), "cpu", cuda_path=cuda_path)
    assert state.scaler is None and state.fused is cuda_path
    inputs = _batches(store, state.cfg, 1)[0]
    before = _weights(state)
    hook = _overflow(state)
    values = read_step_values([train_step(state, inputs)])[0]
    hook.remove()
    assert values["skipped"] == 1.0 and values["grad_norm"] == float("inf")
    assert all(torch.equal(before[n], w) for n, w in _weights(state).items())
    assert read_step_values([train_step(state, inputs)])[0]["skipped"] == 0.0
    assert any(not torch.equal(before[n], w) for n, w in _weights(state).items())


def test_resume_after_an_overflow_continues_identically(store):
    cfg = _cfg("train.amp=true")
    batches = _batches(store, cfg, 4)
    run = build_state(cfg, "cpu", cuda_path=True)
    hook = _overflow(run)
    train_step(run, batches[0])
    hook.remove()
    train_step(run, batches[1])
    assert run.scaler is not None
    saved = _round_trip({"weights": run.model.state_dict(), "meta": state_meta(run), "rng": capture_rng()})
    assert saved["meta"]["scaler"]["scale"] == run.scaler.get_scale() == 2.0**15
    expected = read_step_values([train_step(run, inputs) for inputs in batches[2:]])

    resumed = build_state(cfg, "cpu", cuda_path=True, seed=cfg.train.seed + 1)
    resumed.model.load_state_dict(saved["weights"])
    load_state_meta(resumed, saved["meta"])
    restore_rng(saved["rng"])
    assert resumed.scaler is not None and resumed.scaler.get_scale() == 2.0**15 and resumed.iteration == 2
    assert read_step_values([train_step(resumed, inputs) for inputs in batches[2:]]) == expected
    for name, weight in _weights(run).items():
        assert torch.equal(weight, _weights(resumed)[name])
    assert resumed.scaler.state_dict() == run.scaler.state_dict()


@pytest.mark.parametrize("saved_on_cuda_path", [True, False])
def test_optimizer_state_resumes_across_the_cpu_and_cuda_paths(store, saved_on_cuda_path):
    cfg = _cfg()
    inputs = _batches(store, cfg, 1)[0]
    saved = build_state(cfg, "cpu", cuda_path=saved_on_cuda_path)
    train_step(saved, inputs)
    other = build_state(cfg, "cpu", cuda_path=not saved_on_cuda_path)
    load_state_meta(other, _round_trip(state_meta(saved)))
    assert other.fused is (not saved_on_cuda_path)  # it keeps its own implementation
    values = read_step_values([train_step(other, inputs)])[0]
    assert values["skipped"] == 0.0 and other.iteration == 2


def test_l1_loss_masks_the_other_points_without_an_index():
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 6, 2, generator=generator).requires_grad_()
    target = torch.rand(2, 6, 2, generator=generator)
    positive = torch.tensor([[True, False, True, False, False, False], [False] * 6])
    poisoned = pred.detach().clone()
    poisoned[~positive] = float("nan")  # the non-positive points cannot leak into value or gradient
    poisoned.requires_grad_()
    loss = L1Loss(weight=0.5)
    with HostSyncs() as syncs:
        value = loss(poisoned, target, positive)
    assert dict(syncs.reads) == {} and syncs.host_tensors == 0
    expected = 0.5 * (pred[positive] - target[positive]).abs().sum() / 4
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0.0)
    value.backward()
    assert poisoned.grad is not None and torch.isfinite(poisoned.grad).all()
    assert (poisoned.grad[~positive] == 0).all() and (poisoned.grad[positive] != 0).all()
    assert float(loss(pred, target, torch.zeros(2, 6, dtype=torch.bool)).detach()) == 0.0
