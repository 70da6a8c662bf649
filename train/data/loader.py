"""Streaming batches of queries grouped by video: the trainer's input.

Each epoch walks a seeded shuffle of the videos. A small pool of ``videos_per_batch`` videos is
kept in flight and every batch of ``batch_size`` queries is filled round-robin from the pool, so
a batch mixes several videos (the in-batch contrastive losses need that) while each video's
tokens are read once per epoch and shared by all its queries in a batch (TACoS has 100+ queries
per video). When a pool video runs out of queries the next video takes its place.

Reads: a background thread maps ``prefetch_videos`` videos ahead (``map_stored``: it takes the
disk wait, and the mapping is a view of the page cache, not a copy). Each video is then copied
once per batch, straight into its row of the batch's zero-padded tensor, by ``read_threads``
threads (the copies release the GIL): the work a batch from RAM takes. Tokens of an int8 store
(:mod:`shards.quant`) stay int8 until then and are dequantized into the row (:func:`copy_tokens`;
on the GPU by :func:`gather_on_device`): half the bytes read and held, the same float16 batch a
float16 store of the dequantized tokens gives. Only the last ``layers``
layers are copied when the model fuses fewer than the store holds. The batch tensors come from a
small pool of buffers, reused once the caller has dropped every tensor of an earlier batch (so
later batches cost no page faults); with ``pin_memory`` they are allocated pinned instead of copied
afterwards. A source that keeps tokens on the GPU (:class:`train.data.cache.TokenCache` in mode
``device``) has its batches gathered there: no video or query token is copied on the host.

Memory: tokens held by the loader (pool, read-ahead and the videos of the batch being filled) stay
under ``max_bytes`` (a single video larger than that is still read, alone). When the bound
binds, a batch is emitted early with fewer queries; :class:`StreamingLoader` can say so once
(``report_cuts``), with the bound that would keep the batches whole. Nothing per video is kept
beyond that, so peak memory does not grow with the store; only per-query annotations are held.

Workers: with ``num_workers > 0`` a torch ``DataLoader`` runs one copy per worker process; the
shuffled video list is split by worker id and each worker opens the store itself. Batches then
come from the workers in turn, so their composition depends on ``num_workers`` (but is still
reproducible for a given seed, epoch and worker count).
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.device import thread_device
from shards.schema import Query
from shards.store import open_store
from train.data.assembly import (
    Batch,
    BatchBuilder,
)
from train.data.sources import (
    TokenSource,
    device_tokens,
    select_queries,
)

log = logging.getLogger(__name__)


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
        layers: batches hold the last ``layers`` layers of the source's (``None``: all of them).
        read_threads: threads that copy the rows of a batch (same bytes for any number).
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
    layers: int | None = None
    read_threads: int = 4

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.videos_per_batch < 1 or self.max_bytes < 1:
            raise ValueError("batch_size, videos_per_batch and max_bytes must be positive")
        if self.num_workers < 0 or self.prefetch_videos < 0:
            raise ValueError("num_workers and prefetch_videos must be >= 0")
        if self.read_threads < 1 or (self.layers is not None and self.layers < 1):
            raise ValueError("read_threads and layers must be >= 1")
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
    """Fetches videos in a fixed order, ``depth`` ahead within a byte budget: ``fetch`` (``map_stored``,
    a read-only view of the page cache) runs in a background thread that takes the disk wait when
    ``background``, else on :meth:`take`; without ``fetch`` only the budget is kept (a dry run)."""

    def __init__(
        self,
        source: TokenSource,
        vids: Sequence[str],
        depth: int,
        max_bytes: int,
        stats: LoaderStats,
        fetch: Callable[[str], Any] | None,
        background: bool = True,
    ):
        self._source = source
        self._vids = vids
        self._next = 0
        self._depth = max(depth, 1)
        self._max_bytes = max_bytes
        self._fetch = fetch
        threaded = fetch is not None and background and depth > 0
        self._pool = None
        if threaded:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="r2-read", initializer=thread_device())
        self._pending: deque[tuple[str, int, Future[Any] | None]] = deque()
        self._stats = stats
        self.held = 0

    @property
    def exhausted(self) -> bool:
        """Whether every video was taken."""
        return self._next >= len(self._vids) and not self._pending

    def _fill(self) -> None:
        while self._next < len(self._vids) and len(self._pending) < self._depth:
            vid = self._vids[self._next]
            size = self._source.video_nbytes(vid)
            if self.held and self.held + size > self._max_bytes:
                return
            self.held += size
            self._stats.peak_bytes = max(self._stats.peak_bytes, self.held)
            future = self._pool.submit(self._fetch, vid) if self._pool and self._fetch else None
            self._pending.append((vid, size, future))
            self._next += 1

    def take(self) -> tuple[str, int, Any] | None:
        """The next video ``(vid, bytes, tokens)``, or ``None`` when done or the budget is full."""
        self._fill()
        if not self._pending:
            return None
        vid, size, future = self._pending.popleft()
        if future is not None:
            tokens = future.result()
        else:
            tokens = self._fetch(vid) if self._fetch is not None else None
        self._fill()
        return vid, size, tokens

    def release(self, size: int) -> None:
        self.held -= size

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Live:
    vid: str
    size: int
    tokens: Any
    todo: deque[Query]


@dataclass
class _Planned:
    """A batch decided by :func:`_compose`: its queries, its videos in row order (with their tokens)
    and whether the memory bound emitted it early (``cut``)."""

    queries: list[Query]
    lives: list[_Live]
    cut: bool


def _compose(
    feed: _Feed, groups: dict[str, list[Query]], batch_size: int, pool_size: int
) -> Iterator[_Planned]:
    """The batches of one epoch, filled round-robin from a pool of ``pool_size`` videos of ``feed``.
    A batch's videos are released from the budget once the caller asks for the next batch (so it has
    copied their tokens by then)."""
    pool: list[_Live] = []
    members: dict[str, _Live] = {}
    picks: list[Query] = []
    while True:
        while len(pool) < pool_size:
            got = feed.take()
            if got is None:
                break
            vid, size, tokens = got
            pool.append(_Live(vid, size, tokens, deque(groups[vid])))
        if pool:
            for live in list(pool):
                picks.append(live.todo.popleft())
                members.setdefault(live.vid, live)
                if not live.todo:
                    pool.remove(live)
                if len(picks) == batch_size:
                    break
            if len(picks) < batch_size:
                continue
        elif not picks:
            return
        cut = len(picks) < batch_size and not feed.exhausted
        planned = _Planned(list(picks), list(members.values()), cut)
        yield planned
        in_pool = {id(live) for live in pool}
        for live in planned.lives:
            if id(live) not in in_pool:
                feed.release(live.size)
        picks.clear()
        members.clear()
        del planned  # the tokens of its videos not in the pool (copied by now) are dropped here


@dataclass(frozen=True)
class EpochPlan:
    """Batch sizes of one epoch of a :class:`GroupedQueryDataset`, decided without reading tokens.

    Attributes:
        sizes: queries of each batch (worker after worker).
        cut: per batch, whether the memory bound emitted it early (before ``batch_size`` queries).
        peak_bytes: most video-token bytes one loader process held.
    """

    sizes: list[int]
    cut: list[bool]
    peak_bytes: int


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

    def _video_order(
        self, selected: Sequence[Query], epoch: int
    ) -> tuple[list[str], dict[str, list[Query]]]:
        groups: dict[str, list[Query]] = {}
        if self.config.shuffle:
            rng = np.random.default_rng([self.config.seed, epoch])
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
        vids, groups = self._video_order(selected, self.epoch)
        info = get_worker_info()
        if info is not None:
            vids = vids[info.id :: info.num_workers]
        cfg = self.config
        on_device = device_tokens(source)
        # Tokens on the GPU are fetched in the caller's thread, so their copies run on its CUDA stream.
        fetch = on_device.video_tensor if on_device is not None else source.map_stored
        feed = _Feed(
            source, vids, cfg.prefetch_videos, cfg.max_bytes, self.stats, fetch, background=on_device is None
        )
        build = BatchBuilder(source, cfg.layers, self.pin_memory, cfg.read_threads)
        try:
            for planned in _compose(feed, groups, cfg.batch_size, cfg.videos_per_batch):
                tokens = [live.tokens for live in planned.lives]
                yield build(planned.queries, [live.vid for live in planned.lives], tokens.__getitem__)
        finally:
            feed.close()

    def epoch_plan(self, epoch: int, max_bytes: int | None = None) -> EpochPlan:
        """The batch sizes of ``epoch`` under the bound ``max_bytes`` (default ``config.max_bytes``), for
        ``config.num_workers`` processes, from the video sizes alone (no token is read)."""
        source, selected, _ = self._open()
        vids, groups = self._video_order(selected, epoch)
        cfg = self.config
        bound = cfg.max_bytes if max_bytes is None else max_bytes
        workers = max(1, cfg.num_workers)
        sizes: list[int] = []
        cut: list[bool] = []
        peak = 0
        for worker in range(workers):
            stats = LoaderStats()
            feed = _Feed(source, vids[worker::workers], cfg.prefetch_videos, bound, stats, None)
            for planned in _compose(feed, groups, cfg.batch_size, cfg.videos_per_batch):
                sizes.append(len(planned.queries))
                cut.append(planned.cut)
            peak = max(peak, stats.peak_bytes)
        return EpochPlan(sizes, cut, peak)


def _identity(batch: Any) -> Any:
    """``collate_fn`` of the worker ``DataLoader``: with ``batch_size=None`` each :class:`Batch` as is."""
    return batch


CUT_MARGIN = 1.1
"""The bound suggested when batches are cut: the peak of an unbounded epoch times this (other epochs
shuffle the videos differently)."""


def describe_cuts(config: LoaderConfig, epoch: int, bounded: EpochPlan, unbounded: EpochPlan) -> str:
    """The warning for batches that the memory bound cut in ``epoch`` (``bounded``), with the bound that
    keeps them whole (from the peak of ``unbounded``)."""
    gib = 2**30
    cut = [size for size, was_cut in zip(bounded.sizes, bounded.cut, strict=True) if was_cut]
    needed = math.ceil(CUT_MARGIN * unbounded.peak_bytes / gib)
    return (
        f"the memory bound of the pooled loader cuts {len(cut)} of the {len(bounded.sizes)} batches of "
        f"pass {epoch + 1} over the data to fewer queries than the batch_size={config.batch_size} asked for "
        f"(as few as {min(cut)}, {sum(cut) / len(cut):.0f} on average): the videos of a whole batch, with "
        f"the pool and read-ahead, take up to {unbounded.peak_bytes / gib:.3g} GiB of tokens, more than "
        f"train.loader_memory_gb={config.max_bytes / gib:.3g} allows; --set train.loader_memory_gb={needed} "
        "keeps the batches whole"
    )


class StreamingLoader:
    """The trainer's loader: iterate it once per epoch; :meth:`set_epoch` changes the order.

    With ``config.num_workers == 0`` batches are built in this process (a background thread reads
    ahead; host tensors are allocated pinned with ``pin_memory``); otherwise a torch ``DataLoader``
    with that many worker processes is started per epoch.

    With ``report_cuts`` the first epoch whose batches the memory bound cuts (:class:`EpochPlan`) is
    logged once, as a warning: epoch 0 here, at set-up, later ones when they start.
    """

    def __init__(
        self,
        source: str | Path | TokenSource,
        config: LoaderConfig | None = None,
        query_filter: Callable[[Query], bool] | None = None,
        pin_memory: bool = False,
        report_cuts: bool = False,
    ) -> None:
        self.dataset = GroupedQueryDataset(source, config, query_filter)
        self.config = self.dataset.config
        self.pin_memory = pin_memory
        self.dataset.pin_memory = pin_memory and self.config.num_workers == 0
        self._checked: set[int] | None = set() if report_cuts else None
        self._report_cuts(0)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    @property
    def num_queries(self) -> int:
        """Queries per epoch."""
        return len(self.dataset.queries)

    def _report_cuts(self, epoch: int) -> None:
        """Warn (once per loader) when the memory bound cuts batches of ``epoch``."""
        if self._checked is None or epoch in self._checked:
            return
        self._checked.add(epoch)
        bounded = self.dataset.epoch_plan(epoch)
        if any(bounded.cut):
            unbounded = self.dataset.epoch_plan(epoch, max_bytes=1 << 62)
            log.warning(describe_cuts(self.config, epoch, bounded, unbounded))
            self._checked = None

    def __iter__(self) -> Iterator[Batch]:
        self._report_cuts(self.dataset.epoch)
        if self.config.num_workers == 0:
            yield from self.dataset
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
