"""The training step on CUDA: an fp16 overflow skipped on the GPU and resumed, and the hot loop, which
never waits on the host between two log reads (``torch.cuda.set_sync_debug_mode("error")``).

Every test is marked ``cuda``: skipped where no CUDA device is visible (see ``tests/conftest.py``),
run by ``make test-gpu`` (``pytest -m cuda``) and by a plain ``pytest`` on a machine with a GPU.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.fixtures import TINY_STEP_OVERRIDES, TINY_STEP_SPEC, synthetic_store_fixture
from tests.helpers.synthetic import synthetic_run_config
from train.config import RunConfig
from train.data.batching import ModelInputs
from train.engine.loop import Member
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

pytestmark = pytest.mark.cuda

SPEC = TINY_STEP_SPEC
OVERRIDES = [*TINY_STEP_OVERRIDES, "epochs=1", "train.amp=true"]

store = synthetic_store_fixture(SPEC)


def _gpu_batches(store: Path, count: int) -> tuple[RunConfig, list[ModelInputs]]:
    """The run config on CUDA and its first ``count`` training inputs, on the GPU (epochs repeat)."""
    cfg, data = open_run_data(synthetic_run_config(SPEC, "tacos", OVERRIDES), store, "cuda")
    batches: list[ModelInputs] = []
    epoch = 0
    while len(batches) < count:
        batches += [inputs for inputs, _ in epoch_inputs(data.loader, cfg, data.spec, data.device, epoch)]
        epoch += 1
    torch.cuda.synchronize()
    return cfg, batches[:count]


def _weights(state: TrainState) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in state.model.named_parameters()}


def _round_trip(meta: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(meta, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.fixture
def sync_errors() -> Iterator[None]:
    """Turns the sync debug mode off after the test, also when it fails while the mode is on."""
    yield
    torch.cuda.set_sync_debug_mode(0)


def test_an_overflow_is_skipped_on_the_gpu_and_a_resume_continues_identically(store) -> None:
    cfg, batches = _gpu_batches(store, 4)
    run = build_state(cfg, "cuda")
    assert run.fused and run.scaler is not None and run.device.type == "cuda"
    before = _weights(run)
    param = next(p for p in run.model.parameters() if p.requires_grad)
    hook = param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    out = train_step(run, batches[0])
    hook.remove()
    assert isinstance(out["skipped"], torch.Tensor) and out["skipped"].device.type == "cuda"
    skipped = read_step_values([out])[0]
    assert skipped["skipped"] == 1.0 and not math.isfinite(skipped["grad_norm"])
    assert run.scaler.get_scale() == 2.0**15  # backed off from 2 ** 16
    assert all(torch.equal(before[n], w) for n, w in _weights(run).items())

    train_step(run, batches[1])
    saved = _round_trip(
        {"weights": run.model.state_dict(), "meta": state_meta(run), "rng": capture_rng(run.device)}
    )
    expected = read_step_values([train_step(run, inputs) for inputs in batches[2:]])

    resumed = build_state(cfg, "cuda", seed=cfg.train.seed + 1)
    resumed.model.load_state_dict(saved["weights"])
    load_state_meta(resumed, saved["meta"])
    restore_rng(saved["rng"], resumed.device)
    got = read_step_values([train_step(resumed, inputs) for inputs in batches[2:]])
    assert [g["skipped"] for g in got] == [e["skipped"] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, rel=1e-5, abs=1e-7)
    assert resumed.scaler is not None and resumed.scaler.state_dict() == run.scaler.state_dict()
    for name, weight in _weights(run).items():
        torch.testing.assert_close(_weights(resumed)[name], weight, rtol=1e-5, atol=1e-6)


def test_the_hot_loop_never_waits_on_the_host_between_log_reads(store, tmp_path, sync_errors) -> None:
    cfg, batches = _gpu_batches(store, 8)
    state = build_state(cfg, "cuda")
    member = Member(state, RunPaths(tmp_path), Best("R1@0.5"), capture_rng(state.device), log_every=4)
    for inputs in batches[:4]:  # a first window: optimizer and scaler states, cuBLAS handles
        member.step(inputs, len(inputs))
    assert member.stats.steps == 4
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    for inputs in batches[4:7]:
        member.step(inputs, len(inputs))
    torch.cuda.set_sync_debug_mode(0)
    assert len(member.pending) == 3 and member.stats.steps == 4
    member.step(batches[7], len(batches[7]))  # the log read
    assert member.stats.steps == 8 and not member.pending and member.nonfinite == 0
    assert all(math.isfinite(v) for v in member.stats.totals.values())
