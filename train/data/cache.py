"""A byte-bounded cache of a store's tokens in host or GPU memory: each video is read from disk once.

Uniform batches (the reference's) touch many videos per batch (~26 per TACoS batch of 32), and a
video is drawn again in every batch one of its queries lands in. Streaming from disk would read
each video that many times per epoch; the cache reads it once per run and serves it from memory
afterwards, to the training loader and to validation alike.

Modes (``train.cache``):

* ``device``: video tokens as tensors on the training GPU; batches are padded and gathered there.
* ``ram``: tokens in host memory (batches are assembled into pinned buffers when training on a GPU).
* ``off``: no cache; every batch streams from the store (the page cache does what it can).
* ``auto``: ``device`` when the tokens the run needs fit the GPU's free memory with a margin, else
  ``ram`` when they fit the available host memory with a margin, else ``off``.

The bound (``train.cache_gb``, default: the margin's share of free memory) is in bytes of tokens as
kept. When the tokens do not all fit, the first ones drawn are kept and the rest stream.

Video tokens are kept as the store holds them: an int8 store's (:mod:`shards.quant`) stay packed int8
(values and scales, about half the bytes of float16, so twice the videos fit) and are dequantized
when a batch is assembled, into its float16 rows: on the GPU in the gather (mode ``device``: an
elementwise multiply, free next to the step) or by the row-copy threads on the host (mode ``ram``:
a multiply per value, slower than a plain copy). Dequantizing at fill time instead would double the memory the
cache needs for the same batches. Query tokens (a few per query) are kept as float16.

Only the last ``layers`` layers the model fuses are read and kept (:meth:`FeatureStore.read_video`
with ``layers``): a model fusing fewer layers than the store holds needs a smaller cache. Query
tokens are cached where the videos are (on the GPU in mode ``device``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import psutil
import torch

from shards.errors import ConfigError
from shards.schema import Query
from shards.store import DTYPE
from train.data.assembly import copy_tokens
from train.data.sources import TokenSource, last_layers

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.5
"""Share of the free GPU memory / available host memory a cache may take by default (the rest is
left to the model, its activations and the batches)."""


@dataclass(frozen=True)
class CachePlan:
    """Where a run's tokens live.

    Attributes:
        mode: ``device``, ``ram`` or ``off`` (``auto`` resolved).
        device: where cached tensors live (the training device for ``device``, else the CPU).
        max_bytes: most bytes the cache may hold.
        needed: bytes of every video and query token the run reads.
    """

    mode: str
    device: torch.device
    max_bytes: int
    needed: int

    def describe(self) -> str:
        """One line for the log."""
        gib = 2**30
        if self.mode == "off":
            return f"token cache off: batches stream from the store ({self.needed / gib:.2f} GiB of tokens)"
        share = "all" if self.needed <= self.max_bytes else f"{self.max_bytes / gib:.2f} GiB of"
        return f"token cache in {self.mode} memory: {share} {self.needed / gib:.2f} GiB of tokens"


def needed_bytes(source: TokenSource, queries: Iterable[Query], layers: int | None = None) -> int:
    """Bytes of the video and query tokens of ``queries`` (each video counted once), of their last
    ``layers`` layers (``None``: all the source holds), as a :class:`TokenCache` keeps them: videos as
    stored, queries as float16."""
    stored = source.manifest.layers
    keep = stored if layers is None else layers
    query_row = keep * source.manifest.text_width * 2
    vids: set[str] = set()
    total = 0
    for q in queries:
        if q.vid not in vids:
            vids.add(q.vid)
            total += source.video_nbytes(q.vid) // stored * keep
        total += source.query_length(q.qid) * query_row
    return total


def _free_device_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def plan_cache(
    mode: str, cache_gb: float | None, needed: int, device: torch.device, step_bytes: int = 0
) -> CachePlan:
    """Resolve ``train.cache`` (``auto`` | ``device`` | ``ram`` | ``off``, checked by the config) and
    ``train.cache_gb`` for a run needing ``needed`` bytes on ``device``. On a GPU the default bound
    leaves the training step its ``step_bytes`` (:func:`train.engine.memory.estimate_step`): at most
    ``min(MEMORY_SHARE x free, free - step_bytes)``.

    Raises:
        ConfigError: ``device`` asked for while training on the CPU.
    """
    given = None if cache_gb is None else int(cache_gb * 2**30)
    free = _free_device_bytes(device)
    gpu_room = given if given is not None else max(0, min(int(MEMORY_SHARE * free), free - step_bytes))
    ram_room = given if given is not None else int(MEMORY_SHARE * psutil.virtual_memory().available)
    cpu = torch.device("cpu")
    if mode == "device":
        if device.type != "cuda":
            raise ConfigError("train.cache=device keeps tokens on the GPU but the run trains on the CPU; "
                              "use train.cache=ram (or auto)")
        return CachePlan("device", device, gpu_room, needed)
    if mode == "ram":
        return CachePlan("ram", cpu, ram_room, needed)
    if mode == "auto" and device.type == "cuda" and needed <= gpu_room:
        return CachePlan("device", device, gpu_room, needed)
    if mode == "auto" and needed <= ram_room:
        return CachePlan("ram", cpu, ram_room, needed)
    return CachePlan("off", cpu, 0, needed)


class TokenCache:
    """The tokens of a :class:`TokenSource`, kept in memory after their first read, within a bound.

    It is itself a :class:`TokenSource` of the last ``layers`` layers (metadata from the wrapped source,
    its ``manifest`` with ``layers`` layers, tokens from memory), so the streaming loaders read through
    it; :meth:`video_tensor` and :meth:`query_tensor` give the cached tensors themselves (on the cache's
    device) for batches gathered there. Safe to read from several threads.

    Args:
        source: the store (or any token source).
        plan: mode, device and bound (:func:`plan_cache`); mode ``off`` keeps nothing.
        layers: serve and keep the last ``layers`` layers of the source's (``None``: all).
    """

    def __init__(self, source: TokenSource, plan: CachePlan, layers: int | None = None) -> None:
        stored = source.manifest.layers
        self.layers = stored if layers is None else layers
        if not 1 <= self.layers <= stored:
            raise ValueError(f"layers must be in 1..{stored} (the source's layers), got {layers}")
        self.source = source
        self.manifest = replace(source.manifest, layers=self.layers)
        self.plan = plan
        self.held = 0
        self.disk_reads = 0
        self._videos: dict[str, torch.Tensor] = {}
        self._queries: dict[int | str, torch.Tensor] = {}
        self._lock = threading.Lock()

    @property
    def on_device(self) -> bool:
        """Whether cached tokens live on the GPU (batches are then gathered there)."""
        return self.plan.mode == "device"

    @property
    def device(self) -> torch.device:
        """Where cached tokens live."""
        return self.plan.device

    def _count_read(self) -> None:
        with self._lock:
            self.disk_reads += 1

    def _keep(self, kept: dict[Any, torch.Tensor], key: Any, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` kept under ``key`` on the cache's device when they fit the bound (or what another
        thread kept meanwhile), else ``tokens`` as read."""
        with self._lock:
            earlier = kept.get(key)
            if earlier is not None:
                return earlier
            nbytes = tokens.numel() * tokens.element_size()
            if self.plan.mode == "off" or self.held + nbytes > self.plan.max_bytes:
                return tokens
            self.held += nbytes
            kept[key] = tokens.to(self.plan.device)
            return kept[key]

    def video_tensor(self, vid: str) -> torch.Tensor:
        """Tokens of ``vid`` as stored (``(T, layers, P, C)`` float16, or packed int8
        ``(T, layers, P, C + 2)`` of an int8 store): the cached tensor (on the cache's device), or a
        fresh host read when the bound is reached."""
        cached = self._videos.get(vid)
        if cached is not None:
            return cached
        self._count_read()
        tokens = self.source.read_stored(vid, layers=self.layers)
        return self._keep(self._videos, vid, torch.from_numpy(tokens))

    def video_ids(self) -> list[str]:
        return self.source.video_ids()

    def video_length(self, vid: str) -> int:
        return self.source.video_length(vid)

    def video_fps(self, vid: str) -> float:
        return self.source.video_fps(vid)

    def video_nbytes(self, vid: str) -> int:
        """Bytes of the ``layers`` layers of ``vid`` that the cache serves."""
        return self.source.video_nbytes(vid) // self.source.manifest.layers * self.layers

    def map_stored(self, vid: str) -> np.ndarray:
        """Host view of ``vid``'s tokens as stored (``(T, layers, ...)``, see :meth:`video_tensor`): the
        store's mapping (strided when it holds more layers) with the cache off, else the cached tokens
        (a host copy when they are on the GPU)."""
        if self.plan.mode == "off":
            self._count_read()
            return last_layers(self.source.map_stored(vid), self.layers)
        return self.video_tensor(vid).cpu().numpy()

    def read_stored(self, vid: str, layers: int | None = None) -> np.ndarray:
        """:meth:`map_stored`, its last ``layers`` layers (``None``: all the cache serves)."""
        tokens = self.map_stored(vid)
        return tokens if layers is None else last_layers(tokens, layers)

    def read_video(self, vid: str, out: np.ndarray | None = None, layers: int | None = None) -> np.ndarray:
        """``(T, layers, P, C)`` float16 tokens of ``vid`` (a view of :meth:`map_stored` for a float16
        store), into ``out`` when given."""
        tokens = self.read_stored(vid, layers)
        if out is None and tokens.dtype == DTYPE:
            return tokens
        if out is None:
            out = np.empty((*tokens.shape[:-1], self.manifest.video_width), DTYPE)
        copy_tokens(out, tokens)
        return out

    def map_video(self, vid: str) -> np.ndarray:
        """``(T, layers, P, C)`` float16 tokens of ``vid`` (:meth:`read_video`)."""
        return self.read_video(vid)

    def has_query(self, qid: int | str) -> bool:
        return self.source.has_query(qid)

    def query_length(self, qid: int | str) -> int:
        return self.source.query_length(qid)

    def query_tensor(self, qid: int | str) -> torch.Tensor:
        """``(L, layers, Cq)`` float16 tokens of query ``qid``: the cached tensor (on the cache's device),
        or a fresh host read when the bound is reached."""
        cached = self._queries.get(qid)
        if cached is not None:
            return cached
        tokens = np.ascontiguousarray(last_layers(self.source.read_query(qid), self.layers))
        return self._keep(self._queries, qid, torch.from_numpy(tokens))

    def read_query(self, qid: int | str, out: np.ndarray | None = None) -> np.ndarray:
        """``(L, layers, Cq)`` float16 tokens of query ``qid`` on the host (kept when there is room)."""
        tokens = self.query_tensor(qid).cpu().numpy()
        if out is None:
            return tokens
        out[...] = tokens
        return out

    def annotations(self) -> list[Query]:
        return self.source.annotations()
