"""The training data path on a GPU: pinned host batches, side-stream prefetch, device-cache epochs that never
wait on the host, and validation predictions equal to the CPU's.

Every test is marked ``cuda``: skipped where no CUDA device is visible (``tests/conftest.py``), run by
``make test-gpu`` and by a plain ``pytest`` on a machine with a GPU.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.datasets import get_dataset
from shards.store import open_store
from tests.helpers.synthetic import SyntheticSpec, make_synthetic_store, synthetic_run_config
from train.config import RunConfig
from train.data.batching import ModelInputs, collate_targets, model_inputs, per_query_targets
from train.data.cache import CachePlan, TokenCache
from train.data.loader import LoaderConfig, StreamingLoader
from train.data.uniform import UniformLoader
from train.engine import rundata
from train.engine.evaluate import predict_batch, validation_loader
from train.engine.rundata import epoch_inputs, open_run_data
from train.model import R2Tuning

pytestmark = pytest.mark.cuda

SPEC = SyntheticSpec(n_videos=8, n_heldout=2, clips=16, layers=3, max_len=5, seed=5, heldout_split="test")
OVERRIDES = ["model.dims=32", "model.heads=4", "model.layers=2", "batch_size=4", "train.pool_size=2",
             "train.num_workers=0", "train.read_threads=4"]
TENSORS = ("video", "video_mask", "video_index", "query", "query_mask", "fps")


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "tiny.zarr"
    make_synthetic_store(path, SPEC)
    return path


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """fp32 matmuls and convolutions in full fp32 on the GPU, so CPU and GPU agree closely."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _cfg(*extra: str) -> RunConfig:
    return synthetic_run_config(SPEC, "tacos", [*OVERRIDES, *extra])


def _host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    torch.cuda.synchronize()
    return [t.cpu() for t in tensors]


def test_host_batches_come_from_pinned_buffers_and_copy_without_blocking(tiny_store) -> None:
    store = open_store(tiny_store)
    cache = TokenCache(store, CachePlan("ram", torch.device("cpu"), 2**30, 0), layers=2)
    loaders = [
        UniformLoader(cache, tiny_store, batch_size=4, seed=1, pin_memory=True, layers=2),
        StreamingLoader(tiny_store, LoaderConfig(batch_size=4, layers=2), pin_memory=True),
    ]
    spec, cuda = get_dataset("tacos"), torch.device("cuda")
    for loader in loaders:
        for batch in loader:
            assert all(getattr(batch, name).is_pinned() for name in TENSORS)
            on_gpu = model_inputs(batch, spec, 2, cuda, torch.Generator().manual_seed(0))
            on_cpu = model_inputs(batch, spec, 2, torch.device("cpu"), torch.Generator().manual_seed(0))
            assert all(t.is_cuda for t in on_gpu.tensors())
            for gpu, cpu in zip(_host(on_gpu.tensors()), on_cpu.tensors(), strict=True):
                assert torch.equal(gpu, cpu)
    batch = next(iter(loaders[0]))
    targets = collate_targets(per_query_targets(batch, spec), 16, torch.Generator().manual_seed(0), pin=True)
    assert all(t is None or t.is_pinned() for t in targets)


def _plain_inputs(data: rundata.RunData, cfg: RunConfig, epoch: int) -> list[tuple[ModelInputs, int]]:
    """What :func:`epoch_inputs` yields, built on the current stream without it."""
    data.loader.set_epoch(epoch)
    generator = rundata.pos_clip_generator(cfg.train.seed, epoch)
    layers, device = cfg.model.layers, data.device
    return [(model_inputs(b, data.spec, layers, device, generator), len(b)) for b in data.loader]


@pytest.mark.parametrize("cache", ["ram", "device", "off"])
def test_side_stream_prefetch_gives_the_inputs_of_the_plain_path(tiny_store, cache) -> None:
    cfg = _cfg(f"train.cache={cache}")
    _, gpu = open_run_data(cfg, tiny_store, "cuda")
    _, cpu = open_run_data(cfg, tiny_store, "cpu")
    busy = torch.randn(1024, 1024, device="cuda")
    for epoch in range(2):
        prefetched = []
        for inputs, size in epoch_inputs(gpu.loader, cfg, gpu.spec, gpu.device, epoch):
            for _ in range(4):  # a step's worth of work on the current stream while the next batch copies
                busy = torch.tanh(busy @ busy)
            prefetched.append((_host(inputs.tensors()), size))
        plain = [(_host(x.tensors()), n) for x, n in _plain_inputs(gpu, cfg, epoch)]
        on_cpu = [(x.tensors(), n) for x, n in epoch_inputs(cpu.loader, cfg, cpu.spec, cpu.device, epoch)]
        assert [n for _, n in prefetched] == [n for _, n in plain] == [n for _, n in on_cpu]
        for (a, _), (b, _), (c, _) in zip(prefetched, plain, on_cpu, strict=True):
            assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c, strict=True))


def test_a_device_cache_epoch_never_waits_on_the_host(tiny_store) -> None:
    cfg = _cfg("train.cache=device")
    _, data = open_run_data(cfg, tiny_store, "cuda")
    assert data.loader.cache.on_device
    for _ in epoch_inputs(data.loader, cfg, data.spec, data.device, 0):  # the first epoch fills the cache
        pass
    batches = 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        for inputs, _ in epoch_inputs(data.loader, cfg, data.spec, data.device, 1):
            assert inputs.video.is_cuda and inputs.query.is_cuda
            batches += 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert batches == data.steps_per_epoch(cfg)


def _sorted_rows(windows: np.ndarray | None) -> np.ndarray:
    assert windows is not None
    return windows[np.lexsort((windows[:, 1], windows[:, 0]))]


def test_validation_predictions_on_cuda_equal_the_cpu_ones(tiny_store, no_tf32) -> None:
    cfg = _cfg()
    spec = get_dataset("tacos")
    torch.manual_seed(0)
    on_cpu = R2Tuning(cfg.model, cfg.loss).eval()
    on_gpu = copy.deepcopy(on_cpu).to("cuda")
    store = open_store(tiny_store)
    gathered = TokenCache(store, CachePlan("device", torch.device("cuda"), 2**30, 0), layers=2)
    cpu_preds, gpu_preds, cached_preds = [], [], []
    for batch in validation_loader(tiny_store, cfg, "test"):
        cpu_preds += predict_batch(on_cpu, batch, spec, cfg, torch.device("cpu"))
        gpu_preds += predict_batch(on_gpu, batch, spec, cfg, torch.device("cuda"))
    for batch in validation_loader(gathered, cfg, "test"):
        assert batch.video.is_cuda and batch.query.is_cuda
        cached_preds += predict_batch(on_gpu, batch, spec, cfg, torch.device("cuda"))
    assert len(cpu_preds) == len(gpu_preds) == len(cached_preds) > 0
    for a, b, c in zip(cpu_preds, gpu_preds, cached_preds, strict=True):
        assert a.qid == b.qid == c.qid
        np.testing.assert_allclose(b.saliency, a.saliency, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(_sorted_rows(b.windows), _sorted_rows(a.windows), atol=1e-3, rtol=1e-4)
        np.testing.assert_allclose(c.saliency, b.saliency, atol=1e-6, rtol=1e-6)  # the same inputs
        np.testing.assert_allclose(_sorted_rows(c.windows), _sorted_rows(b.windows), atol=1e-5, rtol=1e-6)
