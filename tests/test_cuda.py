"""GPU paths: AMP steps with GradScaler skips, pinned batches, fp16 CLIP towers, store -> train -> predict.

Every test is marked ``cuda``: skipped where no CUDA device is visible (see ``tests/conftest.py``),
run by ``make test-gpu`` (``pytest -m cuda``) and by a plain ``pytest`` on a machine with a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.backbone import load_backbone
from extract.config import ExtractConfig, sample_paths
from extract.job import run_extraction
from r2.predict import Predictor
from shards.datasets import get_dataset
from shards.store import open_store
from tests.helpers.fixtures import TINY_STEP_OVERRIDES, TINY_STEP_SPEC
from tests.helpers.synthetic import make_synthetic_store, synthetic_run_config
from train.config import RunConfig, apply_overrides, get_preset
from train.data.batching import ModelInputs, model_inputs
from train.data.cache import CachePlan, TokenCache
from train.data.loader import LoaderConfig, StreamingLoader
from train.data.uniform import UniformLoader
from train.engine.step import TrainState, build_state, read_step_values, train_step
from train.engine.trainer import train_run

pytestmark = pytest.mark.cuda

SPEC = TINY_STEP_SPEC
OVERRIDES = [*TINY_STEP_OVERRIDES, "train.amp=true"]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "tiny.zarr"
    make_synthetic_store(path, SPEC)
    return path


def _cfg() -> RunConfig:
    return synthetic_run_config(SPEC, "tacos", OVERRIDES)


def _amp_state_and_inputs(store: Path) -> tuple[TrainState, ModelInputs]:
    """A fresh AMP training state on CUDA and the first batch of ``store`` as its inputs (with targets)."""
    cfg = _cfg()
    state = build_state(cfg, "cuda")
    loader = StreamingLoader(store, LoaderConfig(batch_size=4, videos_per_batch=2), pin_memory=True)
    batch = next(iter(loader))
    generator = torch.Generator().manual_seed(0)
    return state, model_inputs(batch, get_dataset(cfg.dataset), cfg.model.layers, state.device, generator)


def _weights(state: TrainState) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in state.model.named_parameters()}


def _all_finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(w).all()) for w in weights.values())


def _applied_step(state: TrainState, inputs: ModelInputs, tries: int = 8) -> dict[str, float]:
    """Step until the scaler applies one (a first step may overflow at the initial scale and be skipped)."""
    for _ in range(tries):
        out = read_step_values([train_step(state, inputs)])[0]
        if out["skipped"] == 0.0:
            return out
    raise AssertionError(f"no AMP step of {tries} was applied")


def test_amp_step_runs_in_fp16_and_updates_the_weights(tiny_store) -> None:
    state, inputs = _amp_state_and_inputs(tiny_store)
    assert state.amp and state.scaler is not None and state.device.type == "cuda"
    dtypes: set[torch.dtype] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, output: dtypes.add(output.dtype))
        for m in state.model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    before = _weights(state)
    out = _applied_step(state, inputs)
    after = _weights(state)
    for hook in hooks:
        hook.remove()
    assert torch.float16 in dtypes  # the linear layers ran under fp16 autocast
    assert np.isfinite(out["loss"]) and np.isfinite(out["grad_norm"])
    assert _all_finite(after)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(p.dtype == torch.float32 for p in state.model.parameters())  # master weights stay fp32


def test_gradscaler_skips_an_overflowing_step_and_keeps_the_weights(tiny_store) -> None:
    state, inputs = _amp_state_and_inputs(tiny_store)
    assert state.scaler is not None
    param = next(p for p in state.model.parameters() if p.requires_grad)
    overflow = param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    before = _weights(state)
    scale = state.scaler.get_scale()
    out = read_step_values([train_step(state, inputs)])[0]
    overflow.remove()
    assert out["skipped"] == 1.0 and not np.isfinite(out["grad_norm"])
    assert state.scaler.get_scale() == scale * state.scaler.get_backoff_factor()
    after = _weights(state)
    assert all(torch.equal(before[n], after[n]) for n in before)  # the optimizer did not step
    assert _all_finite(after) and state.iteration == 1  # the iteration counts, as in the reference

    _applied_step(state, inputs)  # finite gradients are applied again
    stepped = _weights(state)
    assert _all_finite(stepped) and any(not torch.equal(before[n], stepped[n]) for n in before)


@pytest.mark.parametrize("workers", [0, 1])
def test_pinned_batches_copy_to_the_gpu_without_blocking(tiny_store, workers) -> None:
    config = LoaderConfig(batch_size=4, videos_per_batch=2, num_workers=workers)
    pinned = list(StreamingLoader(tiny_store, config, pin_memory=True))
    plain = list(StreamingLoader(tiny_store, config))
    assert len(pinned) == len(plain) > 0
    tensors = ("video", "video_mask", "video_index", "query", "query_mask", "fps")
    for batch, reference in zip(pinned, plain, strict=True):
        assert all(getattr(batch, name).is_pinned() for name in tensors)
        assert not reference.video.is_pinned()
        on_gpu = batch.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        for name in tensors:
            moved = getattr(on_gpu, name)
            assert moved.device.type == "cuda"
            assert torch.equal(moved.cpu(), getattr(reference, name))


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.float().cpu()
    return float((value.float().cpu() - reference).norm() / reference.norm())


def test_fp16_clip_towers_match_the_fp32_cpu_towers() -> None:
    gpu = load_backbone("ViT-B-32", "random", layers=4, device="cuda", precision="fp16")
    cpu = load_backbone("ViT-B-32", "random", layers=4, device="cpu")
    full = load_backbone("ViT-B-32", "random", layers=4, device="cuda")  # fp32, the default on every device
    assert gpu.weights_sha256 == cpu.weights_sha256  # same seeded random weights
    size = gpu.frame_size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))

    tokens = gpu.encode_frames(images)
    expected = cpu.encode_frames(images)
    exact = full.encode_frames(images)
    assert tokens.device.type == "cuda" and tokens.dtype == torch.float16
    assert exact.device.type == "cuda" and exact.dtype == torch.float32
    assert tokens.shape == expected.shape == exact.shape == (3, 4, 50, 768)
    assert bool(torch.isfinite(tokens).all())
    for layer in range(4):
        drift = _relative_error(tokens[:, layer], expected[:, layer])
        assert drift < 1e-2
        assert _relative_error(exact[:, layer], expected[:, layer]) < drift  # fp32: closer (TF32 convs)

    texts = ["a person drinks from a red cup", "a cyclist rides past a van in the street"]
    for got, want in zip(gpu.encode_texts(texts), cpu.encode_texts(texts), strict=True):
        assert got.device.type == "cuda" and got.shape == want.shape and want.shape[1:] == (4, 512)
        assert bool(torch.isfinite(got).all())
        for layer in range(4):
            assert _relative_error(got[:, layer], want[:, layer]) < 1e-2


def test_sample_store_train_and_predict_on_cuda(tmp_path) -> None:
    videos, files = sample_paths()
    store_path = tmp_path / "sample.zarr"
    cfg = ExtractConfig(
        dataset="charades",
        videos=videos,
        annotations=files,
        out=store_path,
        pretrained="random",
        device="cuda",
        batch_size=16,
        progress=False,
    )
    summary = run_extraction(cfg)
    assert (summary.extracted, summary.failures, summary.exit_code) == (2, {}, 0)
    store = open_store(store_path)
    clips = store.video_length("univtg_charades")  # 30.7 s at Charades' 1 fps

    run = apply_overrides(
        get_preset("charades"), ["epochs=1", "batch_size=4", "warmup=4", "train.num_workers=0"]
    )
    result = train_run(run, store_path, tmp_path / "run", device="cuda", progress=False)
    assert result.epochs == 1
    assert json.loads((tmp_path / "run" / "run.json").read_text())["amp"] is True
    losses = result.history[0]["train"]
    assert "loss" in losses and all(np.isfinite(v) for v in losses.values())

    predictor = Predictor.from_checkpoint(tmp_path / "run" / "last.pt", device="cuda")
    assert next(predictor.grounder.model.parameters()).device.type == "cuda"
    video = predictor.encode_video(videos / "univtg_charades.mp4", batch_size=16)
    assert video.tokens.shape == (clips, 4, 50, 768) and video.tokens.dtype == np.float16
    stored = torch.from_numpy(store.read_video("univtg_charades"))
    assert _relative_error(torch.from_numpy(video.tokens), stored) < 1e-2  # same frames, same fp32 towers
    prediction = predictor.predict(video, "person drinks from a red cup in the doorway.")
    assert prediction.saliency.shape == (clips,) and np.isfinite(prediction.saliency).all()
    assert len(prediction.moments) > 0 and np.isfinite(prediction.moments).all()
    assert (prediction.moments[:, 0] >= 0).all() and (prediction.moments[:, 1] <= video.duration).all()


def test_device_cache_gathers_batches_on_the_gpu_like_the_host_path(tiny_store) -> None:
    store = open_store(tiny_store)
    gpu = TokenCache(store, CachePlan("device", torch.device("cuda"), 2**30, 0))
    host = TokenCache(store, CachePlan("ram", torch.device("cpu"), 2**30, 0))
    loaders = [UniformLoader(c, tiny_store, batch_size=4, seed=1, splits=()) for c in (gpu, host)]
    for on_gpu, on_host in zip(*loaders, strict=True):
        assert on_gpu.video.is_cuda and not on_host.video.is_cuda
        assert torch.equal(on_gpu.video.cpu(), on_host.video) and on_gpu.vids == on_host.vids
    assert gpu.disk_reads == len(store.video_ids())


def test_amp_training_with_the_device_cache_matches_the_steps_of_the_ram_cache(tiny_store, tmp_path) -> None:
    steps = {}
    for mode in ("device", "ram"):
        cfg = apply_overrides(_cfg(), ["epochs=2", f"train.cache={mode}"])
        result = train_run(cfg, tiny_store, tmp_path / mode, device="cuda", progress=False)
        steps[mode] = [h["steps"] for h in result.history]
        assert all(np.isfinite(h["train"]["loss"]) for h in result.history)
    assert steps["device"] == steps["ram"]
