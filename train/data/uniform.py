"""The reference's batches: a uniform shuffle of the training queries, cut into batches.

Every epoch the ``N`` queries, repeated ``repeat`` times (the reference's ``RepeatDataset``), are
shuffled as one list of ``N x repeat`` items by a generator seeded with ``(seed, epoch)`` and cut
into batches of ``batch_size``, the last one partial: ``ceil(N x repeat / batch_size)`` steps, as a
shuffled torch ``DataLoader`` without ``drop_last`` gives them. The composition and order of the
batches are decided here, in the calling process, from the seed and the epoch only; worker
processes (``num_workers > 0``, streaming from the store) only fetch the tokens of the batches they
are handed, so the batches never depend on the number of workers.

Each batch holds its distinct videos once (``Batch.video`` rows, ``video_index`` per query), and
only the last ``layers`` layers the model fuses. Tokens come from a
:class:`train.data.cache.TokenCache`: gathered on the GPU when the cache lives there (in the calling
thread, so on its CUDA stream; no token is copied on the host), else copied by ``read_threads``
threads straight into padded host buffers (pinned when ``pin_memory``), the next batch assembled in a
background thread while the current one trains. Tokens of an int8 store are dequantized on the way
(:func:`train.data.assembly.copy_tokens`, :func:`train.data.assembly.gather_on_device`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shards.device import thread_device
from shards.schema import Query
from shards.store import open_store
from train.data.assembly import Batch, BatchBuilder
from train.data.cache import CachePlan, TokenCache
from train.data.sources import select_queries


def uniform_batches(
    num_queries: int, repeat: int, batch_size: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """Query indices of every batch of ``epoch``: a permutation of ``num_queries x repeat`` items
    (item ``i`` is query ``i mod num_queries``) cut into batches of ``batch_size``, the last partial."""
    order = np.random.default_rng([seed, epoch]).permutation(num_queries * repeat) % num_queries
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class BatchAssembler:
    """Builds the :class:`Batch` of a list of queries from a token cache.

    Args:
        cache: where tokens come from (videos gathered on its device when it lives on the GPU).
        pin: allocate host batch tensors in pinned memory (training on a GPU).
        layers: keep the last ``layers`` layers of the cache's (``None``: all).
        threads: threads that copy the rows of a host batch.
    """

    def __init__(
        self, cache: TokenCache, pin: bool = False, layers: int | None = None, threads: int = 1
    ) -> None:
        self.cache = cache
        self._build = BatchBuilder(cache, layers, pin, threads)

    def __call__(self, queries: Sequence[Query]) -> Batch:
        """The batch of ``queries`` (in this order; each distinct video once, in first-use order)."""
        cache = self.cache
        vids = list(dict.fromkeys(q.vid for q in queries))
        if cache.on_device:
            return self._build(queries, vids, lambda i: cache.video_tensor(vids[i]))
        return self._build(queries, vids, lambda i: cache.map_stored(vids[i]))


class _StoreBatches(Dataset):
    """Worker side of streaming: batch ``i`` of a fixed list, assembled from the store (opened once
    per worker process, no cache)."""

    def __init__(
        self,
        store: str | Path,
        batches: list[list[Query]],
        verify_reads: bool = True,
        layers: int | None = None,
        threads: int = 1,
    ) -> None:
        self.store = store
        self.verify_reads = verify_reads
        self.batches = batches
        self.layers = layers
        self.threads = threads
        self._assemble: BatchAssembler | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Batch:
        if self._assemble is None:
            source = open_store(self.store, verify_reads=self.verify_reads)
            plan = CachePlan("off", torch.device("cpu"), 0, 0)
            self._assemble = BatchAssembler(TokenCache(source, plan, self.layers), threads=self.threads)
        return self._assemble(self.batches[index])


def _identity(batch: Any) -> Any:
    return batch


class UniformLoader:
    """The trainer's default loader: uniform batches of queries (module docstring).

    Args:
        cache: the run's token cache (it wraps the store).
        store_path: the store, reopened by worker processes (``num_workers > 0`` with the cache off).
        batch_size: queries per batch.
        repeat: the training set is repeated this many times per epoch.
        seed: the shuffle of epoch ``e`` depends on ``(seed, e)`` only.
        splits: splits to serve (``()``: all).
        query_filter: extra predicate on the queries.
        num_workers: worker processes that fetch streamed batches (ignored when tokens are cached:
            they are served from memory in this process).
        pin_memory: pinned host batches (training on a GPU).
        verify_reads: workers check the CRC-32 of what they read (:func:`shards.store.open_store`).
        layers: batches hold the last ``layers`` layers of the store's (``None``: all).
        read_threads: threads that copy the rows of a host batch (same bytes for any number).
    """

    def __init__(
        self,
        cache: TokenCache,
        store_path: str | Path,
        batch_size: int,
        repeat: int = 1,
        seed: int = 0,
        splits: tuple[str, ...] = ("train",),
        query_filter: Callable[[Query], bool] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        verify_reads: bool = True,
        layers: int | None = None,
        read_threads: int = 4,
    ) -> None:
        self.cache = cache
        self.layers = layers
        self.read_threads = read_threads
        self.verify_reads = verify_reads
        self.store_path = store_path
        self.batch_size = batch_size
        self.repeat = repeat
        self.seed = seed
        self.num_workers = num_workers if cache.plan.mode == "off" else 0
        self.pin_memory = pin_memory
        self.queries, self.skipped = select_queries(cache, splits, query_filter)
        self.epoch = 0
        self._assemble = BatchAssembler(cache, pin_memory, layers, read_threads)

    @property
    def num_queries(self) -> int:
        """Distinct queries served (each ``repeat`` times per epoch)."""
        return len(self.queries)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch`` (call before iterating)."""
        self.epoch = int(epoch)

    def epoch_batches(self) -> list[list[Query]]:
        """The queries of every batch of the current epoch, in order."""
        indices = uniform_batches(len(self.queries), self.repeat, self.batch_size, self.seed, self.epoch)
        return [[self.queries[i] for i in batch] for batch in indices]

    def __iter__(self) -> Iterator[Batch]:
        batches = self.epoch_batches()
        if self.num_workers > 0:
            loader = DataLoader(
                _StoreBatches(self.store_path, batches, self.verify_reads, self.layers, self.read_threads),
                batch_size=None,
                shuffle=False,
                num_workers=self.num_workers,
                collate_fn=_identity,
                pin_memory=self.pin_memory,
            )
            yield from loader
            return
        if self.cache.on_device:  # kernel launches only: gathered in this thread, on its CUDA stream
            for queries in batches:
                yield self._assemble(queries)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="r2-batch", initializer=thread_device()) as pool:
            ahead: deque[Future[Batch]] = deque()
            for queries in batches:
                ahead.append(pool.submit(self._assemble, queries))
                if len(ahead) > 1:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
