"""Streaming batches of queries grouped by video: the trainer's input.

Each epoch walks a seeded shuffle of the videos. A small pool of ``videos_per_batch`` videos is
kept in flight and every batch of ``batch_size`` queries is filled round-robin from the pool, so
a batch mixes several videos (the in-batch contrastive losses need that) while each video's
tokens are read once per epoch and shared by all its queries in a batch (TACoS has 100+ queries
per video). When a pool video runs out of queries the next video takes its place.

Reads: a background thread maps ``prefetch_videos`` videos ahead (``map_video``: it takes the
disk wait, and the mapping is a view of the page cache, not a copy). Each video is then copied
once per batch, straight into its row of the batch's zero-padded tensor: the work a batch from
RAM takes. The batch tensors come from a small pool of buffers, reused once the caller has
dropped every tensor of an earlier batch (so later batches cost no page faults); with
``pin_memory`` they are allocated pinned instead of copied afterwards.

Memory: tokens held by the loader (pool, read-ahead and the videos of the batch being filled) stay
under ``max_bytes`` (a single video larger than that is still read, alone). When the bound
binds, a batch is emitted early with fewer queries. Nothing per video is kept beyond that, so peak
memory does not grow with the store; only per-query annotations are held.

Workers: with ``num_workers > 0`` a torch ``DataLoader`` runs one copy per worker process; the
shuffled video list is split by worker id and each worker opens the store itself. Batches then
come from the workers in turn, so their composition depends on ``num_workers`` (but is still
reproducible for a given seed, epoch and worker count).
"""

from __future__ import annotations

import math
import os
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.schema import Query
from shards.store import DTYPE, FeatureStore, Manifest, open_store


class TokenSource(Protocol):
    """What the loader reads: implemented by :class:`FeatureStore` and :class:`MemorySource`."""

    manifest: Manifest

    def video_ids(self) -> list[str]: ...
    def video_length(self, vid: str) -> int: ...
    def video_fps(self, vid: str) -> float: ...
    def video_nbytes(self, vid: str) -> int: ...
    def read_video(self, vid: str, out: np.ndarray | None = None) -> np.ndarray: ...
    def map_video(self, vid: str) -> np.ndarray: ...
    def has_query(self, qid: int | str) -> bool: ...
    def query_length(self, qid: int | str) -> int: ...
    def read_query(self, qid: int | str, out: np.ndarray | None = None) -> np.ndarray: ...
    def annotations(self) -> list[Query]: ...


class MemorySource:
    """All tokens in RAM behind the :class:`TokenSource` interface (benchmark baseline, tests).

    Args:
        manifest: geometry of the tokens.
        videos: video id -> tokens ``(T, k, P, C)`` float16.
        fps: video id -> clips per second.
        queries: query id -> tokens ``(L, k, Cq)`` float16.
        annotations: the queries' annotations.
    """

    def __init__(
        self,
        manifest: Manifest,
        videos: dict[str, np.ndarray],
        fps: dict[str, float],
        queries: dict[int | str, np.ndarray],
        annotations: Sequence[Query],
    ) -> None:
        self.manifest = manifest
        self._videos = videos
        self._fps = fps
        self._queries = queries
        self._annotations = list(annotations)

    @classmethod
    def from_store(cls, store: FeatureStore) -> MemorySource:
        """Read a whole store into RAM."""
        vids = store.video_ids()
        return cls(
            store.manifest,
            {v: store.read_video(v) for v in vids},
            {v: store.video_fps(v) for v in vids},
            {q: store.read_query(q) for q in store.query_ids()},
            store.annotations(),
        )

    def video_ids(self) -> list[str]:
        return sorted(self._videos)

    def video_length(self, vid: str) -> int:
        return self._videos[vid].shape[0]

    def video_fps(self, vid: str) -> float:
        return self._fps[vid]

    def video_nbytes(self, vid: str) -> int:
        return self._videos[vid].nbytes

    def read_video(self, vid: str, out: np.ndarray | None = None) -> np.ndarray:
        """The stored array itself (no copy) or a copy into ``out``."""
        if out is None:
            return self._videos[vid]
        out[...] = self._videos[vid]
        return out

    def map_video(self, vid: str) -> np.ndarray:
        """The stored array itself (no copy)."""
        return self._videos[vid]

    def has_query(self, qid: int | str) -> bool:
        return qid in self._queries

    def query_length(self, qid: int | str) -> int:
        return self._queries[qid].shape[0]

    def read_query(self, qid: int | str, out: np.ndarray | None = None) -> np.ndarray:
        """The stored array itself (no copy) or a copy into ``out``."""
        if out is None:
            return self._queries[qid]
        out[...] = self._queries[qid]
        return out

    def annotations(self) -> list[Query]:
        return list(self._annotations)


@dataclass
class Batch:
    """One batch of B queries over V distinct videos.

    Attributes:
        video: ``(V, T_max, k, P, C)`` float16 tokens, zero-padded in time.
        video_mask: ``(V, T_max)`` bool, true on real clips.
        video_index: ``(B,)`` long, the row of ``video`` each query belongs to.
        query: ``(B, L_max, k, Cq)`` float16 tokens, zero-padded.
        query_mask: ``(B, L_max)`` bool, true on real tokens.
        fps: ``(V,)`` float32 clips per second of each video.
        queries: the B annotations as stored (:mod:`train.data.targets` clamps moments to ``T / fps``).
        vids: the V video ids, in row order.
    """

    video: torch.Tensor
    video_mask: torch.Tensor
    video_index: torch.Tensor
    query: torch.Tensor
    query_mask: torch.Tensor
    fps: torch.Tensor
    queries: list[Query]
    vids: list[str]

    def __len__(self) -> int:
        return len(self.queries)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        tensors = ("video", "video_mask", "video_index", "query", "query_mask", "fps")
        return Batch(**{n: fn(getattr(self, n)) for n in tensors}, queries=self.queries, vids=self.vids)

    def pin_memory(self) -> Batch:
        """Pinned copy (used by ``DataLoader(pin_memory=True)``)."""
        return self._map(torch.Tensor.pin_memory)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy of the batch with every tensor on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


@dataclass
class LoaderConfig:
    """Knobs of the streaming loader.

    Attributes:
        batch_size: queries per batch (B).
        videos_per_batch: pool size M, videos in flight that each batch draws from.
        splits: splits to keep (``()`` keeps all).
        shuffle: shuffle videos and the queries within each video every epoch.
        seed: base seed; the epoch's order depends on ``(seed, epoch)``.
        num_workers: DataLoader worker processes (0 = in the calling process).
        prefetch_videos: videos read ahead by a background thread (0 = read on demand).
        max_bytes: bound on video-token bytes held by one loader process.
        verify_reads: a store opened from its path checks the CRC-32 of what it reads.
    """

    batch_size: int = 32
    videos_per_batch: int = 8
    splits: tuple[str, ...] = ("train",)
    shuffle: bool = True
    seed: int = 0
    num_workers: int = 0
    prefetch_videos: int = 8
    max_bytes: int = 2 << 30
    verify_reads: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.videos_per_batch < 1 or self.max_bytes < 1:
            raise ValueError("batch_size, videos_per_batch and max_bytes must be positive")
        if self.num_workers < 0 or self.prefetch_videos < 0:
            raise ValueError("num_workers and prefetch_videos must be >= 0")
        if isinstance(self.splits, str):
            self.splits = (self.splits,)


@dataclass
class LoaderStats:
    """Counters of one loader process over its last epoch.

    Attributes:
        peak_bytes: most video-token bytes held at once (bounded by ``LoaderConfig.max_bytes``).
        skipped: queries left out, by reason: ``split``, ``filter``, ``no video``, ``no query tokens``.
    """

    peak_bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


class _Feed:
    """Maps videos (``map_video``: a read-only view of the page cache, no copy) in a fixed order,
    ``depth`` ahead in a background thread that takes the disk wait, within a byte budget."""

    def __init__(
        self, source: TokenSource, vids: Sequence[str], depth: int, max_bytes: int, stats: LoaderStats
    ):
        self._source = source
        self._vids = vids
        self._next = 0
        self._depth = max(depth, 1)
        self._max_bytes = max_bytes
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="r2-read") if depth > 0 else None
        self._pending: deque[tuple[str, int, Future[np.ndarray] | None]] = deque()
        self._stats = stats
        self.held = 0

    def _fill(self) -> None:
        while self._next < len(self._vids) and len(self._pending) < self._depth:
            vid = self._vids[self._next]
            size = self._source.video_nbytes(vid)
            if self.held and self.held + size > self._max_bytes:
                return
            self.held += size
            self._stats.peak_bytes = max(self._stats.peak_bytes, self.held)
            future = self._pool.submit(self._source.map_video, vid) if self._pool else None
            self._pending.append((vid, size, future))
            self._next += 1

    def take(self) -> tuple[str, int, np.ndarray] | None:
        """The next video ``(vid, bytes, tokens)``, or ``None`` when done or the budget is full."""
        self._fill()
        if not self._pending:
            return None
        vid, size, future = self._pending.popleft()
        tokens = future.result() if future is not None else self._source.map_video(vid)
        self._fill()
        return vid, size, tokens

    def release(self, size: int) -> None:
        self.held -= size

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class BatchBuffers:
    """Float16 arrays for the padded batch tensors, reused once nothing refers to them any more.

    A buffer is handed out again only when the array made from its last use is gone, which means
    every tensor and view of that batch is gone (``torch.from_numpy`` keeps the array alive), so
    a batch the caller still holds is never overwritten. At most ``keep`` buffers are kept (one in
    the caller's hands, one being filled); with ``pin`` the tensors are allocated in pinned memory
    instead (torch's caching host allocator then does the reuse, safely for asynchronous copies).
    """

    def __init__(self, keep: int = 2, pin: bool = False) -> None:
        self._keep = keep
        self._pin = pin
        self._slots: list[tuple[np.ndarray, weakref.ref[np.ndarray]]] = []

    def take(self, shape: tuple[int, ...]) -> tuple[np.ndarray, torch.Tensor]:
        """An uninitialised float16 array of ``shape`` and the tensor sharing its memory."""
        if self._pin:
            tensor = torch.empty(shape, dtype=torch.float16, pin_memory=True)
            return tensor.numpy(), tensor
        size = math.prod(shape)
        free = [i for i, (_, user) in enumerate(self._slots) if user() is None]
        fits = [i for i in free if self._slots[i][0].size >= size]
        if fits:
            slot, flat = fits[0], self._slots[fits[0]][0]
        elif free or len(self._slots) < self._keep:
            slot, flat = free[0] if free else len(self._slots), np.empty(size, DTYPE)
        else:  # every kept buffer is still in use: this one is not kept
            array = np.empty(shape, DTYPE)
            return array, torch.from_numpy(array)
        array = flat[:size].reshape(shape)
        entry = (flat, weakref.ref(array))
        if slot == len(self._slots):
            self._slots.append(entry)
        else:
            self._slots[slot] = entry
        return array, torch.from_numpy(array)


def pad_rows(
    buffers: BatchBuffers,
    lengths: Sequence[int],
    tail: tuple[int, ...],
    read: Callable[[int, np.ndarray], object],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor ``(N, max(lengths), *tail)`` whose row ``i`` holds ``lengths[i]`` items filled in
    place by ``read(i, out)`` and zeros after, and its ``(N, max(lengths))`` bool mask."""
    longest = max(lengths)
    array, tensor = buffers.take((len(lengths), longest, *tail))
    mask = np.zeros((len(lengths), longest), bool)
    for i, n in enumerate(lengths):
        read(i, array[i, :n])
        array[i, n:] = 0
        mask[i, :n] = True
    return tensor, torch.from_numpy(mask)


@dataclass
class _Live:
    vid: str
    size: int
    tokens: np.ndarray
    todo: deque[Query]


class GroupedQueryDataset(IterableDataset):
    """Iterable of :class:`Batch` over the selected queries of a store, grouped by video.

    Args:
        source: a store path (opened lazily in each process), an open :class:`FeatureStore`, or a
            :class:`MemorySource`.
        config: loader knobs.
        query_filter: extra predicate on :class:`Query`; queries must also be in ``config.splits``
            (when given) and have their video and query tokens in the source.

    Attributes:
        pin_memory: allocate the batch tensors in pinned memory (set by :class:`StreamingLoader`
            when it runs in the calling process; needs CUDA).
    """

    def __init__(
        self,
        source: str | Path | TokenSource,
        config: LoaderConfig | None = None,
        query_filter: Callable[[Query], bool] | None = None,
    ) -> None:
        self.config = config or LoaderConfig()
        self.pin_memory = False
        self.epoch = 0
        self.stats = LoaderStats()
        self._source_arg = source
        self._filter = query_filter
        self._opened: tuple[int, TokenSource, list[Query], dict[str, int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch`` (call before iterating)."""
        self.epoch = int(epoch)

    def _open(self) -> tuple[TokenSource, list[Query], dict[str, int]]:
        """Source and selected queries of this process (reopened after a fork)."""
        if self._opened is None or self._opened[0] != os.getpid():
            src = self._source_arg
            verify = self.config.verify_reads
            source = open_store(src, verify_reads=verify) if isinstance(src, str | Path) else src
            selected, skipped = select_queries(source, self.config.splits, self._filter)
            self._opened = (os.getpid(), source, selected, skipped)
        return self._opened[1], self._opened[2], self._opened[3]

    @property
    def queries(self) -> list[Query]:
        """The selected queries (one epoch yields each exactly once)."""
        return self._open()[1]

    def _video_order(self, selected: Sequence[Query]) -> tuple[list[str], dict[str, list[Query]]]:
        groups: dict[str, list[Query]] = {}
        if self.config.shuffle:
            rng = np.random.default_rng([self.config.seed, self.epoch])
            rank = rng.permutation(len(selected))
            ordered = [selected[i] for i in np.argsort(rank, kind="stable")]
        else:
            ordered = list(selected)
        for q in ordered:
            groups.setdefault(q.vid, []).append(q)
        vids = sorted(groups)
        if self.config.shuffle:
            vids = [vids[i] for i in rng.permutation(len(vids))]
        return vids, groups

    def __iter__(self) -> Iterator[Batch]:
        source, selected, skipped = self._open()
        self.stats = LoaderStats(skipped=dict(skipped))
        vids, groups = self._video_order(selected)
        info = get_worker_info()
        if info is not None:
            vids = vids[info.id :: info.num_workers]
        cfg = self.config
        feed = _Feed(source, vids, cfg.prefetch_videos, cfg.max_bytes, self.stats)
        try:
            yield from _Assembler(source, cfg, self.pin_memory).batches(feed, groups)
        finally:
            feed.close()


class _Assembler:
    """Fills the batches of one epoch from a :class:`_Feed` (the round-robin pool of videos)."""

    def __init__(self, source: TokenSource, config: LoaderConfig, pin: bool) -> None:
        self._source = source
        self._config = config
        self._video_buffers = BatchBuffers(pin=pin)
        self._query_buffers = BatchBuffers(pin=pin)

    def batches(self, feed: _Feed, groups: dict[str, list[Query]]) -> Iterator[Batch]:
        cfg = self._config
        pool: list[_Live] = []
        members: dict[str, _Live] = {}
        picks: list[tuple[Query, _Live]] = []
        while True:
            while len(pool) < cfg.videos_per_batch:
                got = feed.take()
                if got is None:
                    break
                vid, size, tokens = got
                pool.append(_Live(vid, size, tokens, deque(groups[vid])))
            if not pool:
                if not picks:
                    return
                yield self._emit(feed, picks, members, pool)
                continue
            for live in list(pool):
                picks.append((live.todo.popleft(), live))
                members.setdefault(live.vid, live)
                if not live.todo:
                    pool.remove(live)
                if len(picks) == cfg.batch_size:
                    break
            if len(picks) == cfg.batch_size:
                yield self._emit(feed, picks, members, pool)

    def _emit(
        self, feed: _Feed, picks: list[tuple[Query, _Live]], members: dict[str, _Live], pool: list[_Live]
    ) -> Batch:
        """Assemble the batch of ``picks``, then release the videos no longer needed."""
        source, m = self._source, self._source.manifest
        lives = list(members.values())
        row = {live.vid: i for i, live in enumerate(lives)}
        video, video_mask = pad_rows(
            self._video_buffers,
            [live.tokens.shape[0] for live in lives],
            m.video_shape,
            lambda i, out: np.copyto(out, lives[i].tokens),
        )
        qids = [q.qid for q, _ in picks]
        query, query_mask = pad_rows(
            self._query_buffers,
            [source.query_length(qid) for qid in qids],
            m.query_shape,
            lambda i, out: source.read_query(qids[i], out),
        )
        fps = [source.video_fps(live.vid) for live in lives]
        batch = Batch(
            video=video,
            video_mask=video_mask,
            video_index=torch.tensor([row[live.vid] for _, live in picks], dtype=torch.long),
            query=query,
            query_mask=query_mask,
            fps=torch.tensor(fps, dtype=torch.float32),
            queries=[q for q, _ in picks],
            vids=[live.vid for live in lives],
        )
        in_pool = {id(live) for live in pool}
        for live in lives:
            if id(live) not in in_pool:
                feed.release(live.size)
        picks.clear()
        members.clear()
        return batch


def select_queries(
    source: TokenSource, splits: Sequence[str], query_filter: Callable[[Query], bool] | None
) -> tuple[list[Query], dict[str, int]]:
    """Queries to serve, in annotation order, and counts of the skipped ones by reason."""
    have_video = set(source.video_ids())
    selected: list[Query] = []
    skipped = {"split": 0, "filter": 0, "no video": 0, "no query tokens": 0}
    for q in source.annotations():
        if splits and q.split not in splits:
            skipped["split"] += 1
        elif query_filter is not None and not query_filter(q):
            skipped["filter"] += 1
        elif q.vid not in have_video:
            skipped["no video"] += 1
        elif not source.has_query(q.qid):
            skipped["no query tokens"] += 1
        else:
            selected.append(q)
    return selected, skipped


def _identity(batch: Any) -> Any:
    """``collate_fn`` of the worker ``DataLoader``: with ``batch_size=None`` each :class:`Batch` as is."""
    return batch


class StreamingLoader:
    """The trainer's loader: iterate it once per epoch; :meth:`set_epoch` changes the order.

    With ``config.num_workers == 0`` batches are built in this process (a background thread reads
    ahead); otherwise a torch ``DataLoader`` with that many worker processes is started per epoch.
    """

    def __init__(
        self,
        source: str | Path | TokenSource,
        config: LoaderConfig | None = None,
        query_filter: Callable[[Query], bool] | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = GroupedQueryDataset(source, config, query_filter)
        self.config = self.dataset.config
        self.pin_memory = pin_memory
        self.dataset.pin_memory = pin_memory and self.config.num_workers == 0

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    @property
    def num_queries(self) -> int:
        """Queries per epoch."""
        return len(self.dataset.queries)

    def __iter__(self) -> Iterator[Batch]:
        if self.config.num_workers == 0:
            for batch in self.dataset:
                yield batch.pin_memory() if self.pin_memory else batch
            return
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.config.num_workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        yield from loader
