"""The reference's uniform batches and the token cache: composition, independence of the workers,
each video read once, and the same batches from every cache mode."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.errors import ConfigError
from shards.store import open_store
from tests.helpers.fixtures import synthetic_store_fixture
from tests.helpers.synthetic import SyntheticSpec, synthetic_run_config
from train.checkpoint import read_checkpoint
from train.data.cache import CachePlan, TokenCache, plan_cache
from train.data.uniform import BatchAssembler, UniformLoader, uniform_batches
from train.engine.rundata import open_run_data
from train.engine.trainer import train_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TACOS_SHAPE = SyntheticSpec(
    n_videos=24, n_heldout=4, clips=12, queries_per_video=12, min_len=1, max_len=2, disjoint=False,
    dataset="tacos",
)
TINY = ["epochs=2", "batch_size=8", "model.dims=16", "model.heads=2", "warmup=2", "train.num_workers=0"]


store = synthetic_store_fixture(TACOS_SHAPE)


def _cache(store: Path, mode: str = "ram") -> TokenCache:
    return TokenCache(open_store(store), CachePlan(mode, torch.device("cpu"), 2**40, 0))


def test_every_query_repeat_times_per_epoch_in_ceil_batches() -> None:
    batches = uniform_batches(10, 3, 4, seed=1, epoch=0)
    assert [len(b) for b in batches] == [4] * 7 + [2]  # ceil(30 / 4) steps, the last partial
    assert Counter(np.concatenate(batches).tolist()) == {i: 3 for i in range(10)}
    same = uniform_batches(10, 3, 4, seed=1, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(batches, same, strict=True))
    other = np.concatenate(uniform_batches(10, 3, 4, seed=1, epoch=1))
    assert not np.array_equal(np.concatenate(batches), other)


def _expected_distinct(per_video: list[int], batch: int) -> float:
    """E[distinct videos] of ``batch`` queries drawn uniformly without replacement."""
    total = sum(per_video)
    return sum(1 - math.comb(total - n, batch) / math.comb(total, batch) for n in per_video)


def test_distinct_videos_per_batch_match_the_uniform_expectation(store: Path) -> None:
    loader = UniformLoader(_cache(store), store, batch_size=32, seed=0)
    per_video = list(Counter(q.vid for q in loader.queries).values())
    counts = []
    for epoch in range(20):
        loader.set_epoch(epoch)
        counts += [len({q.vid for q in batch}) for batch in loader.epoch_batches() if len(batch) == 32]
    expected = _expected_distinct(per_video, 32)
    assert abs(np.mean(counts) - expected) <= 0.1 * expected, (np.mean(counts), expected)
    pooled_like = 8  # the pooled loader's default: every batch from 8 videos
    assert np.mean(counts) > 1.5 * pooled_like


def _batches(loader: UniformLoader) -> list[tuple]:
    out = []
    for batch in loader:
        rows = [(batch.vids[int(r)], q.qid) for r, q in zip(batch.video_index, batch.queries, strict=True)]
        out.append((rows, batch.video.float().sum().item(), batch.query.float().sum().item()))
    return out


def test_cache_modes_give_the_same_batches_and_read_each_video_once(store: Path) -> None:
    streamed = _cache(store, "off")
    cached = _cache(store, "ram")
    on_device = _cache(store, "device")  # the GPU path, gathered on the CPU here
    loaders = [UniformLoader(c, store, batch_size=8, repeat=2, seed=3) for c in (streamed, cached, on_device)]
    for epoch in range(2):
        results = []
        for loader in loaders:
            loader.set_epoch(epoch)
            results.append(_batches(loader))
        assert results[0] == results[1] == results[2]
    videos = len({q.vid for q in loaders[0].queries})
    assert cached.disk_reads == on_device.disk_reads == videos
    assert streamed.disk_reads > 2 * videos


def test_device_gather_equals_host_assembly(store: Path) -> None:
    queries = UniformLoader(_cache(store), store, batch_size=8).queries[:8]
    host = BatchAssembler(_cache(store, "ram"))(queries)
    device = BatchAssembler(_cache(store, "device"))(queries)
    assert torch.equal(host.video, device.video) and torch.equal(host.video_mask, device.video_mask)
    assert torch.equal(host.query, device.query) and host.vids == device.vids


def test_workers_only_fetch_the_same_steps_and_weights(store: Path, tmp_path: Path) -> None:
    runs = {}
    for workers in (0, 2):
        extra = ["train.cache=off", f"train.num_workers={workers}"]
        cfg = synthetic_run_config(TACOS_SHAPE, "tacos", [*TINY, *extra])
        result = train_run(cfg, store, tmp_path / f"w{workers}", device="cpu", progress=False)
        runs[workers] = result
    assert [h["steps"] for h in runs[0].history] == [h["steps"] for h in runs[2].history]
    queries = 20 * 12  # training videos x queries per video
    assert runs[0].history[0]["steps"] == math.ceil(queries / 8)
    first, second = (read_checkpoint(runs[w].run_dir / "last.pt").state_dict for w in (0, 2))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_cache_plan_auto_and_bounds() -> None:
    cpu = torch.device("cpu")
    assert plan_cache("auto", None, 1 << 20, cpu).mode == "ram"
    assert plan_cache("auto", 1e-6, 1 << 20, cpu).mode == "off"  # 1 KiB bound: streams
    assert plan_cache("off", None, 1 << 20, cpu).mode == "off"
    with pytest.raises(ConfigError, match="train.cache=device"):
        plan_cache("device", None, 1 << 20, cpu)


def test_run_data_uses_the_cache_for_training_and_validation(store: Path) -> None:
    cfg = synthetic_run_config(TACOS_SHAPE, "tacos", [*TINY, "train.cache=ram"])
    _, data = open_run_data(cfg, store, "cpu")
    assert isinstance(data.loader, UniformLoader) and data.val_loader is not None
    for _ in data.loader:
        pass
    for _ in data.val_loader:
        pass
    cache = data.loader.cache
    assert cache.plan.mode == "ram" and cache.disk_reads == TACOS_SHAPE.n_videos
    assert data.steps_per_epoch(cfg) == math.ceil(data.loader.num_queries / 8)
