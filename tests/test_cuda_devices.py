"""GPU placement and memory on real GPUs: ``--device cuda:N`` opens no context elsewhere, sweep trials
spread over two GPUs, and the step memory estimate against ``torch.cuda.max_memory_allocated``.

Every test is marked ``cuda``: skipped where no CUDA device is visible (``tests/conftest.py``), run by
``make test-gpu``; the CPU versions (mocked GPU counts) are in tests/test_train_sweep_devices.py and
tests/test_train_memory.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from shards.datasets import get_dataset
from tests.helpers.synthetic import SyntheticSpec, make_synthetic_store, synthetic_run_config
from train.data.batching import model_inputs
from train.data.loader import LoaderConfig, StreamingLoader
from train.engine.memory import estimate_step
from train.engine.step import build_state, train_step
from train.sweep.runner import default_workers, plan_sweep, run_sweep
from train.sweep.spec import build_spec
from train.sweep.trials import TrialRequest

pytestmark = pytest.mark.cuda

LOW, HIGH = 0.7, 1.5
"""The estimate stays within this factor of ``torch.cuda.max_memory_allocated`` of one AMP step."""
ROOT = Path(__file__).resolve().parents[1]


def _contexts() -> list[bool]:
    """Whether this process holds a CUDA context on each visible GPU."""
    has_context = torch._C._cuda_hasPrimaryContext  # type: ignore[attr-defined]
    return [bool(has_context(i)) for i in range(torch.cuda.device_count())]


def test_training_on_the_last_gpu_opens_no_context_on_the_others(tmp_path) -> None:
    """A fresh process trains on ``cuda:<last>`` through ``r2 train``'s path; afterwards that GPU is the
    current device and no other GPU has a context (with one GPU: the current device only)."""
    script = textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from tests.helpers.synthetic import SyntheticSpec, make_synthetic_store, synthetic_run_config
        from train.engine.trainer import train_run
        spec = SyntheticSpec(n_videos=4, n_heldout=1, clips=16, layers=2, max_len=5)
        make_synthetic_store({str(tmp_path / "s.zarr")!r}, spec)
        cfg = synthetic_run_config(spec, "tacos", ["epochs=1", "batch_size=4", "model.dims=32",
                                                   "model.heads=4", "warmup=1"])
        last = torch.cuda.device_count() - 1
        train_run(cfg, {str(tmp_path / "s.zarr")!r}, {str(tmp_path / "run")!r}, device=f"cuda:{{last}}",
                  progress=False)
        contexts = [bool(torch._C._cuda_hasPrimaryContext(i)) for i in range(last + 1)]
        print(json.dumps({{"current": torch.cuda.current_device(), "last": last, "contexts": contexts}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["current"] == seen["last"]
    assert seen["contexts"] == [i == seen["last"] for i in range(seen["last"] + 1)]


def gpu_trial(request: TrialRequest) -> dict[str, float]:
    """Record the GPU a trial runs on (current device) and where its process holds contexts."""
    torch.ones(1, device=request.device)
    contexts = _contexts()
    return {"score": 0.0, "gpu": float(torch.cuda.current_device()),
            "asked": float(torch.device(request.device).index), "contexts": float(sum(contexts))}


def _plan(tmp_path: Path, device: str, name: str):
    store = tmp_path / "store.zarr"
    store.mkdir(exist_ok=True)
    spec = build_spec(preset="charades", store=str(store), grid=["lr=1e-3,2e-3,3e-3,4e-3"])
    return plan_sweep(spec, tmp_path / name, device=device, key_metric="score")


def test_sweep_trials_spread_over_two_gpus_and_an_index_keeps_one(tmp_path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    assert default_workers(4, "cuda") == min(4, torch.cuda.device_count())
    assert default_workers(4, "cuda:1") == 1
    spread = run_sweep(_plan(tmp_path, "cuda", "spread"), trial_fn=gpu_trial, workers=2)
    gpus = [r.metrics["gpu"] for r in spread.records]
    assert all(r.status == "ok" for r in spread.records), [r.error for r in spread.records]
    assert sorted(set(gpus)) == [0.0, 1.0]
    assert all(r.metrics["gpu"] == r.metrics["asked"] and r.metrics["contexts"] == 1 for r in spread.records)
    one = run_sweep(_plan(tmp_path, "cuda:1", "one"), trial_fn=gpu_trial, workers=2)
    assert {r.metrics["gpu"] for r in one.records} == {1.0}
    assert all(r.metrics["contexts"] == 1 for r in one.records)


SPEC = SyntheticSpec(n_videos=16, clips=40, layers=4, tokens=50, width=768, text_width=512,
                     queries_per_video=4, disjoint=False)
"""ViT-B/32 token geometry (P = 50, C = 768, k = 4), T = 40 clips, 64 queries: batches of 16 make a
step of about 2 GB with AMP."""
OVERRIDES = ["batch_size=16", "train.amp=true", "train.cache=ram", "epochs=2", "warmup=1"]


def _applied(state, batches) -> None:
    """Step on ``batches`` until the scaler applies a step (then the AdamW moments exist)."""
    for inputs, _ in batches:
        if not bool(train_step(state, inputs)["skipped"]):
            return
    raise AssertionError("no AMP step was applied")


def test_step_memory_estimate_matches_the_allocator_peak_of_one_step(tmp_path) -> None:
    """One step with the loader batch on the GPU (as the device token cache gives it) and no prefetch:
    the allocator's peak is within [LOW, HIGH] of the estimate without the prefetched batch."""
    make_synthetic_store(tmp_path / "s.zarr", SPEC)
    cfg = synthetic_run_config(SPEC, "tacos", OVERRIDES)
    batches = list(StreamingLoader(tmp_path / "s.zarr", LoaderConfig(batch_size=16, videos_per_batch=4)))
    state = build_state(cfg, "cuda")
    dataset = get_dataset("tacos")

    def inputs_of(batch, seed: int):
        return model_inputs(batch.to("cuda"), dataset, 4, state.device, torch.Generator().manual_seed(seed))

    _applied(state, ((inputs_of(b, i), len(b)) for i, b in enumerate(batches * 4)))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    inputs = inputs_of(batches[0], 99)
    train_step(state, inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    estimate = estimate_step(cfg, inputs.video.size(1), inputs.query.size(1), prefetch=False)
    assert LOW * peak <= estimate.total <= HIGH * peak, (estimate.table(), peak)


def test_training_loop_memory_is_within_the_estimate(tmp_path) -> None:
    """The training loop's batches (built on a side stream while the previous step runs) and steps:
    the allocator's reserved peak over an epoch is within [LOW, HIGH] of the full estimate."""
    from shards.store import open_store
    from train.engine.memory import store_extent
    from train.engine.rundata import epoch_inputs, open_run_data

    make_synthetic_store(tmp_path / "s.zarr", SPEC)
    cfg, data = open_run_data(synthetic_run_config(SPEC, "tacos", OVERRIDES), tmp_path / "s.zarr", "cuda")
    state = build_state(cfg, data.device)
    for inputs, _ in epoch_inputs(data.loader, cfg, data.spec, data.device, 0):
        train_step(state, inputs)
    del inputs
    assert state.optimizer.state                      # a step was applied: the AdamW moments exist
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    for inputs, _ in epoch_inputs(data.loader, cfg, data.spec, data.device, 1):
        train_step(state, inputs)
    torch.cuda.synchronize()
    reserved = torch.cuda.max_memory_reserved()
    estimate = estimate_step(cfg, *store_extent(open_store(tmp_path / "s.zarr")))
    assert LOW * reserved <= estimate.total <= HIGH * reserved, (estimate.table(), reserved)
