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

The bound (``train.cache_gb``, default: the margin's share of free memory) is in bytes of fp16
tokens. When the tokens do not all fit, the first ones drawn are kept and the rest stream.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from shards.errors import ConfigError
from shards.schema import Query
from train.data.loader import TokenSource

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


def needed_bytes(source: TokenSource, queries: Iterable[Query]) -> int:
    """Bytes of the video and query tokens of ``queries`` (each video counted once)."""
    vids: set[str] = set()
    total = 0
    for q in queries:
        if q.vid not in vids:
            vids.add(q.vid)
            total += source.video_nbytes(q.vid)
        total += source.query_length(q.qid) * int(np.prod(source.manifest.query_shape)) * 2
    return total


def _free_device_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def plan_cache(mode: str, cache_gb: float | None, needed: int, device: torch.device) -> CachePlan:
    """Resolve ``train.cache`` (``auto`` | ``device`` | ``ram`` | ``off``, checked by the config) and
    ``train.cache_gb`` for a run needing ``needed`` bytes on ``device``.

    Raises:
        ConfigError: ``device`` asked for while training on the CPU.
    """
    given = None if cache_gb is None else int(cache_gb * 2**30)
    gpu_room = given if given is not None else int(MEMORY_SHARE * _free_device_bytes(device))
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

    It is itself a :class:`TokenSource` (metadata from the wrapped source, tokens from memory), so
    the streaming loaders read through it; :meth:`video_tensor` gives the cached tensor itself (on
    the cache's device) for batches gathered there.

    Args:
        source: the store (or any token source).
        plan: mode, device and bound (:func:`plan_cache`); mode ``off`` keeps nothing.
    """

    def __init__(self, source: TokenSource, plan: CachePlan) -> None:
        self.source = source
        self.manifest = source.manifest
        self.plan = plan
        self.held = 0
        self.disk_reads = 0
        self._videos: dict[str, torch.Tensor] = {}
        self._queries: dict[int | str, np.ndarray] = {}

    @property
    def on_device(self) -> bool:
        """Whether cached videos live on the GPU (batches are then gathered there)."""
        return self.plan.mode == "device"

    def _room(self, nbytes: int) -> bool:
        if self.plan.mode == "off" or self.held + nbytes > self.plan.max_bytes:
            return False
        self.held += nbytes
        return True

    def video_tensor(self, vid: str) -> torch.Tensor:
        """``(T, k, P, C)`` float16 tokens of ``vid``: the cached tensor (on the cache's device), or a
        fresh read when the bound is reached."""
        cached = self._videos.get(vid)
        if cached is not None:
            return cached
        tokens = torch.from_numpy(self.source.read_video(vid))
        self.disk_reads += 1
        if self._room(tokens.numel() * tokens.element_size()):
            tokens = tokens.to(self.plan.device)
            self._videos[vid] = tokens
        return tokens

    def video_ids(self) -> list[str]:
        return self.source.video_ids()

    def video_length(self, vid: str) -> int:
        return self.source.video_length(vid)

    def video_fps(self, vid: str) -> float:
        return self.source.video_fps(vid)

    def video_nbytes(self, vid: str) -> int:
        return self.source.video_nbytes(vid)

    def map_video(self, vid: str) -> np.ndarray:
        """Host view of ``vid``'s tokens (a host copy when they are cached on the GPU)."""
        if self.plan.mode == "off":
            self.disk_reads += 1
            return self.source.map_video(vid)
        return self.video_tensor(vid).cpu().numpy()

    def read_video(self, vid: str, out: np.ndarray | None = None) -> np.ndarray:
        tokens = self.map_video(vid)
        if out is None:
            return tokens
        out[...] = tokens
        return out

    def has_query(self, qid: int | str) -> bool:
        return self.source.has_query(qid)

    def query_length(self, qid: int | str) -> int:
        return self.source.query_length(qid)

    def read_query(self, qid: int | str, out: np.ndarray | None = None) -> np.ndarray:
        """``(L, k, Cq)`` float16 tokens of query ``qid`` (kept in host memory when there is room)."""
        tokens = self._queries.get(qid)
        if tokens is None:
            tokens = self.source.read_query(qid)
            if self._room(tokens.nbytes):
                self._queries[qid] = tokens
        if out is None:
            return tokens
        out[...] = tokens
        return out

    def annotations(self) -> list[Query]:
        return self.source.annotations()
