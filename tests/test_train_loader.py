"""Streaming loader: coverage, grouped reads, determinism, padding, memory bound, workers."""

from __future__ import annotations

import weakref
from collections import Counter

import numpy as np
import pytest
import torch

from shards.schema import Query
from shards.store import FeatureStore, create_store, open_store
from train.data.loader import LoaderConfig, StreamingLoader
from train.data.sources import MemorySource

K, P, C, CQ = 2, 3, 8, 4
FPS = 0.5


def vtok(i: int, t: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal((t, K, P, C)).astype(np.float16)


def qtok(qid: int) -> np.ndarray:
    return np.random.default_rng(1000 + qid).standard_normal((2 + qid % 5, K, CQ)).astype(np.float16)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, tiny_manifest):
    """8 videos (T = 3..10), 1..15 queries each (60 train + 8 val), plus 2 queries of a missing video."""
    path = tmp_path_factory.mktemp("loader") / "s.zarr"
    s = create_store(path, tiny_manifest((K, P, C, CQ), dataset="tacos", fps=FPS))
    queries = []
    for i in range(8):
        t = 3 + i
        s.write_video(f"v{i}", vtok(i, t), FPS)
        for _ in range(1 + 2 * i):
            qid = len(queries)
            moments = [[0.0, 2.0 * t + 4.0]]  # ends past T / fps: the loader serves it as stored
            queries.append(Query(f"v{i}", qid, "q", 2.0 * t, "train", moments))
        queries.append(Query(f"v{i}", len(queries), "q", 2.0 * t, "val"))
    queries += [Query("gone", 900 + j, "q", 8.0, "train") for j in range(2)]
    s.write_queries([q.qid for q in queries], [qtok(q.qid) for q in queries])
    s.write_annotations(queries)
    return path


class CountingStore(FeatureStore):
    """A store that counts whole-video reads (the loader maps videos; copies would be reads too)."""

    def __init__(self, base: FeatureStore) -> None:
        super().__init__(base.path, base.manifest, writable=False)
        self.reads: Counter[str] = Counter()
        self.mappings: list[weakref.ref] = []

    def read_video(self, vid, out=None, layers=None):
        self.reads[vid] += 1
        return super().read_video(vid, out, layers)

    def read_stored(self, vid, layers=None):
        self.reads[vid] += 1
        return super().read_stored(vid, layers)

    def map_stored(self, vid):
        self.reads[vid] += 1
        mapped = super().video_array(vid).map()
        self.mappings.append(weakref.ref(mapped))
        return mapped


def train_qids(store_path) -> list[int]:
    return sorted(
        q.qid for q in open_store(store_path).annotations() if q.split == "train" and q.vid != "gone"
    )


def signature(loader) -> list[tuple[list, list]]:
    return [([q.qid for q in b.queries], b.vids) for b in loader]


def test_every_selected_query_once_per_epoch_with_one_read_per_video(store_path):
    source = CountingStore(open_store(store_path))
    loader = StreamingLoader(source, LoaderConfig(batch_size=8, videos_per_batch=3))
    assert loader.num_queries == 64
    for epoch in range(2):
        loader.set_epoch(epoch)
        source.reads.clear()
        batches = list(loader)
        assert sorted(q.qid for b in batches for q in b.queries) == train_qids(store_path)
        assert source.reads == Counter({f"v{i}": 1 for i in range(8)})
        assert len(source.mappings) == 8 * (epoch + 1) and not any(m() for m in source.mappings)  # unmapped
        assert all(len(b) == 8 for b in batches[:-1])
        assert sum(len(b.vids) > 1 for b in batches) >= len(batches) - 1  # batches mix videos
    stats = loader.dataset.stats
    assert stats.skipped == {"split": 8, "filter": 0, "no video": 2, "no query tokens": 0}


def test_seeded_and_reproducible(store_path):
    def make(seed):
        return StreamingLoader(store_path, LoaderConfig(batch_size=5, videos_per_batch=2, seed=seed))

    a, b = make(7), make(7)
    first = signature(a)
    assert first == signature(b)
    a.set_epoch(1)
    assert signature(a) != first
    assert signature(make(8)) != first
    a.set_epoch(0)
    assert signature(a) == first


def test_padding_masks_and_index(store_path):
    store = open_store(store_path)
    stored = {q.qid: q for q in store.annotations()}
    loader = StreamingLoader(
        store_path, LoaderConfig(batch_size=6, videos_per_batch=3, splits=("train", "val"))
    )
    seen = 0
    for b in loader:
        assert b.video.dtype == b.query.dtype == torch.float16 and b.video_index.dtype == torch.long
        assert b.video_mask.dtype == b.query_mask.dtype == torch.bool
        assert b.video.shape[0] == len(b.vids) == b.fps.shape[0] == b.video_mask.shape[0]
        for row, vid in enumerate(b.vids):
            t = store.video_length(vid)
            assert (
                b.video.shape[1] >= t
                and int(b.video_mask[row].sum()) == t
                and bool(b.video_mask[row, :t].all())
            )
            np.testing.assert_array_equal(b.video[row, :t].numpy(), store.read_video(vid))
            assert not b.video[row, t:].any()
            assert float(b.fps[row]) == FPS
        for i, q in enumerate(b.queries):
            assert b.vids[int(b.video_index[i])] == q.vid
            tokens = qtok(q.qid)
            n = tokens.shape[0]
            np.testing.assert_array_equal(b.query[i, :n].numpy(), tokens)
            assert int(b.query_mask[i].sum()) == n and not b.query[i, n:].any()
            assert q == stored[q.qid]
        seen += len(b)
    assert seen == 72


def test_memory_bound_limits_videos_in_flight(store_path):
    source = CountingStore(open_store(store_path))
    biggest = max(source.video_nbytes(v) for v in source.video_ids())
    cfg = LoaderConfig(batch_size=16, videos_per_batch=8, max_bytes=2 * biggest, prefetch_videos=4)
    loader = StreamingLoader(source, cfg)
    batches = list(loader)
    assert all(sum(source.video_nbytes(v) for v in b.vids) <= 2 * biggest for b in batches)
    unbounded = list(StreamingLoader(source, LoaderConfig(batch_size=16, videos_per_batch=8)))
    assert max(len(b.vids) for b in batches) < max(len(b.vids) for b in unbounded)
    assert 0 < loader.dataset.stats.peak_bytes <= 2 * biggest
    assert sorted(q.qid for b in batches for q in b.queries) == train_qids(store_path)
    assert set(source.reads.values()) == {2}  # once per loader run


def test_memory_source_gives_the_same_batches(store_path):
    cfg = LoaderConfig(batch_size=7, videos_per_batch=3, seed=3)
    ram = MemorySource.from_store(open_store(store_path))
    from_disk, from_ram = list(StreamingLoader(store_path, cfg)), list(StreamingLoader(ram, cfg))
    assert [b.vids for b in from_disk] == [b.vids for b in from_ram]
    for x, y in zip(from_disk, from_ram, strict=True):
        assert x.queries == y.queries
        assert bool((x.video == y.video).all()) and bool((x.query == y.query).all())


def test_two_workers_cover_the_epoch_reproducibly(store_path):
    cfg = LoaderConfig(batch_size=8, videos_per_batch=2, num_workers=2)
    loader = StreamingLoader(store_path, cfg, query_filter=lambda q: q.qid % 2 == 0)
    first = signature(loader)
    expected = [q for q in train_qids(store_path) if q % 2 == 0]
    assert sorted(qid for qids, _ in first for qid in qids) == expected
    assert signature(loader) == first
    assert len({v for _, vids in first for v in vids}) == 8
    batches = list(loader)  # all held at once: worker buffers must not be reused under them
    for b in batches:
        assert_rows_hold(b, open_store(store_path))


def assert_rows_hold(batch, store) -> None:
    """Each video row of ``batch`` holds its video's tokens followed by zeros."""
    for row, vid in enumerate(batch.vids):
        t = store.video_length(vid)
        np.testing.assert_array_equal(batch.video[row, :t].numpy(), vtok(int(vid[1:]), t))
        assert not batch.video[row, t:].any()


def test_held_batches_are_never_overwritten_and_dropped_buffers_are_reused(store_path):
    store = open_store(store_path)
    cfg = LoaderConfig(batch_size=6, videos_per_batch=3)
    held = []
    for b in StreamingLoader(store_path, cfg):
        held.append((b, b.video[:, :2].clone(), b.video[-1:]))  # the batch, a copy and a view
    for b, head, view in held:
        assert_rows_hold(b, store)
        assert bool((b.video[:, :2] == head).all()) and view.data_ptr() == b.video[-1].data_ptr()
    del held
    pointers = [b.video.data_ptr() for b in StreamingLoader(store_path, cfg)]
    assert len(set(pointers)) < len(pointers) / 2  # the caller drops each batch: buffers come back


def test_a_view_alone_keeps_its_batch_buffer(store_path):
    store = open_store(store_path)
    kept = [(b.video[:, :, -1:], b.vids) for b in StreamingLoader(store_path, LoaderConfig(batch_size=6))]
    for view, vids in kept:  # only a view of each batch survived the iteration
        for row, vid in enumerate(vids):
            t = store.video_length(vid)
            np.testing.assert_array_equal(view[row, :t].numpy(), vtok(int(vid[1:]), t)[:, -1:])
