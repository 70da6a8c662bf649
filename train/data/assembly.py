"""One batch from a token source: :class:`Batch` (B queries over V distinct videos) and
:class:`BatchBuilder`, which copies each video's tokens once into its row of a zero-padded float16
tensor (``read_threads`` threads, pinned buffers reused once dropped, int8 tokens dequantized into the
row) or gathers them on the GPU when the source keeps them there."""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shards.device import thread_device
from shards.quant import SCALE_BYTES, unpack
from shards.schema import Query
from shards.store import DTYPE
from train.data.sources import (
    TokenSource,
    device_tokens,
    last_layers,
)


@dataclass
class Batch:
    """One batch of B queries over V distinct videos.

    Attributes:
        video: ``(V, T_max, k, P, C)`` float16 tokens, zero-padded in time (on the GPU when gathered
            from a device cache, else on the host, pinned when the loader pins).
        video_mask: ``(V, T_max)`` bool, true on real clips.
        video_index: ``(B,)`` long, the row of ``video`` each query belongs to.
        query: ``(B, L_max, k, Cq)`` float16 tokens, zero-padded (where ``video`` is).
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

    _TENSORS = ("video", "video_mask", "video_index", "query", "query_mask", "fps")

    def tensors(self) -> list[torch.Tensor]:
        """Its tensors, in field order."""
        return [getattr(self, n) for n in self._TENSORS]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        moved = dict(zip(self._TENSORS, map(fn, self.tensors()), strict=True))
        return Batch(**moved, queries=self.queries, vids=self.vids)

    def pin_memory(self) -> Batch:
        """Pinned copy (used by ``DataLoader(pin_memory=True)``)."""
        return self._map(torch.Tensor.pin_memory)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy of the batch with every tensor on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def tokens_to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy of the batch with its token tensors (``video``, ``query``) on ``device``; the masks, index
        and rates stay where they are (the targets are computed from them on the host)."""
        return dataclasses.replace(
            self,
            video=self.video.to(device, non_blocking=non_blocking),
            query=self.query.to(device, non_blocking=non_blocking),
        )


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
        self.pin = pin
        self._slots: list[tuple[np.ndarray, weakref.ref[np.ndarray]]] = []

    def take(self, shape: tuple[int, ...]) -> tuple[np.ndarray, torch.Tensor]:
        """An uninitialised float16 array of ``shape`` and the tensor sharing its memory."""
        if self.pin:
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


def for_each_row(fill: Callable[[int], object], count: int, threads: int) -> None:
    """Call ``fill(i)`` for every ``i < count`` on up to ``threads`` threads (all done on return; the
    first error is raised). Each call must write its own row only."""
    if threads <= 1 or count <= 1:
        for i in range(count):
            fill(i)
        return
    workers = min(threads, count)
    with ThreadPoolExecutor(workers, thread_name_prefix="r2-rows", initializer=thread_device()) as pool:
        for _ in pool.map(fill, range(count)):
            pass


def length_mask(lengths: Sequence[int], pin: bool = False) -> torch.Tensor:
    """``(N, max(lengths))`` bool tensor, row ``i`` true on its first ``lengths[i]`` entries (pinned
    host memory with ``pin``)."""
    mask = torch.empty((len(lengths), max(lengths)), dtype=torch.bool, pin_memory=pin)
    np.less(np.arange(mask.shape[1])[None], np.asarray(lengths)[:, None], out=mask.numpy())
    return mask


def pad_rows(
    buffers: BatchBuffers,
    lengths: Sequence[int],
    tail: tuple[int, ...],
    read: Callable[[int, np.ndarray], object],
    threads: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor ``(N, max(lengths), *tail)`` whose row ``i`` holds ``lengths[i]`` items filled in
    place by ``read(i, out)`` and zeros after, and its ``(N, max(lengths))`` bool mask (both pinned
    when ``buffers`` pin). The rows are filled by ``threads`` threads (:func:`for_each_row`)."""
    longest = max(lengths)
    array, tensor = buffers.take((len(lengths), longest, *tail))

    def fill(i: int) -> None:
        read(i, array[i, : lengths[i]])
        array[i, lengths[i] :] = 0

    for_each_row(fill, len(lengths), threads)
    return tensor, length_mask(lengths, buffers.pin)


_CHUNK = 1 << 20
"""Values dequantized per step on the host (bounds the float32 temporary)."""


def copy_tokens(out: np.ndarray, stored: np.ndarray) -> None:
    """Write tokens as stored (``(T, ...)``: float16, or packed int8 ``(..., C + 2)``, :mod:`shards.quant`)
    into ``out`` (float16 ``(T, ..., C)``): a copy, or the dequantization, bit for bit that of
    :func:`shards.quant.dequantize`: the float32 product rounded to float16 (by torch, several times
    faster than numpy at it), ``_CHUNK`` values at a time."""
    if stored.dtype == DTYPE:
        np.copyto(out, stored)
        return
    q, scale = unpack(stored)
    rows = max(1, _CHUNK // max(1, math.prod(out.shape[1:])))
    buffer = np.empty((min(rows, out.shape[0]), *out.shape[1:]), np.float32)
    for start in range(0, out.shape[0], rows):
        stop = min(start + rows, out.shape[0])
        product = buffer[: stop - start]
        np.copyto(product, q[start:stop], casting="unsafe")
        product *= scale[start:stop].astype(np.float32)
        torch.from_numpy(out[start:stop]).copy_(torch.from_numpy(product))


def dequantize_tensor(stored: torch.Tensor, out: torch.Tensor) -> None:
    """Write a tensor of tokens as stored (float16, or packed int8 ``(..., C + 2)``) into the float16
    tensor ``out`` (``(..., C)``, same device), dequantizing as :func:`copy_tokens` does."""
    if stored.dtype == torch.float16:
        out.copy_(stored, non_blocking=True)
        return
    width = stored.shape[-1] - SCALE_BYTES
    scale = stored[..., width:].contiguous().view(torch.float16).float()
    out.copy_(stored[..., :width].float().mul_(scale))


def gather_on_device(rows: Sequence[torch.Tensor], layers: int, device: torch.device) -> torch.Tensor:
    """``(N, max T, layers, ..., C)`` float16 on ``device``: row ``i`` holds the last ``layers`` layers
    of ``rows[i]`` (tokens as stored, float16 or packed int8: copied or dequantized on the device when
    it lives there), zeros after. Nothing is allocated on the host."""
    longest = max(r.size(0) for r in rows)
    width = rows[0].shape[-1] - (SCALE_BYTES if rows[0].dtype == torch.int8 else 0)
    shape = (len(rows), longest, layers, *rows[0].shape[2:-1], width)
    out = torch.zeros(shape, dtype=torch.float16, device=device)
    for i, r in enumerate(rows):
        dequantize_tensor(last_layers(r, layers), out[i, : r.size(0)])
    return out


def read_query_into(source: TokenSource, qid: int | str, out: np.ndarray) -> None:
    """Copy the last ``out.shape[1]`` layers of query ``qid``'s tokens into ``out`` (``(L, layers, Cq)``)."""
    if out.shape[1] == source.manifest.layers:
        source.read_query(qid, out)
    else:
        np.copyto(out, last_layers(source.read_query(qid), out.shape[1]))


class BatchBuilder:
    """Builds the :class:`Batch` of a list of queries over their videos: host rows copied into
    (pinned) buffers by ``threads`` threads, or gathered on the GPU when ``source`` keeps its tokens
    there (:func:`device_tokens`).

    Args:
        source: where lengths, fps and query tokens come from.
        layers: keep the last ``layers`` layers of the source's (``None``: all).
        pin: host tensors of the batch in pinned memory (training on a GPU).
        threads: threads that copy the rows of one batch.
    """

    def __init__(
        self, source: TokenSource, layers: int | None = None, pin: bool = False, threads: int = 1
    ) -> None:
        stored = source.manifest.layers
        self.layers = stored if layers is None else layers
        if not 1 <= self.layers <= stored:
            raise ValueError(f"layers must be in 1..{stored} (the source's layers), got {layers}")
        self.source = source
        self.pin = pin
        self.threads = threads
        self._video_buffers = BatchBuffers(pin=pin)
        self._query_buffers = BatchBuffers(pin=pin)

    def __call__(
        self,
        queries: Sequence[Query],
        vids: Sequence[str],
        video: Callable[[int], Any],
    ) -> Batch:
        """The batch of ``queries`` (in this order) over the distinct ``vids`` (row order): ``video(i)``
        gives the tokens of ``vids[i]`` as stored (``(T, k, P, C)`` float16 or ``(T, k, P, C + 2)`` packed
        int8; a host array, or a tensor on a device source); on the host it is called in the copying
        threads."""
        source, layers, pin = self.source, self.layers, self.pin
        _, tokens, width = source.manifest.video_shape
        lengths = [source.video_length(v) for v in vids]
        qids = [q.qid for q in queries]
        query_lengths = [source.query_length(qid) for qid in qids]
        on_device = device_tokens(source)
        if on_device is not None:
            device = on_device.device
            video_tokens = gather_on_device([video(i) for i in range(len(vids))], layers, device)
            query = gather_on_device([on_device.query_tensor(qid) for qid in qids], layers, device)
            video_mask, query_mask = length_mask(lengths, pin), length_mask(query_lengths, pin)
        else:
            video_tokens, video_mask = pad_rows(
                self._video_buffers,
                lengths,
                (layers, tokens, width),
                lambda i, out: copy_tokens(out, last_layers(video(i), layers)),
                self.threads,
            )
            query, query_mask = pad_rows(
                self._query_buffers,
                query_lengths,
                (layers, source.manifest.text_width),
                lambda i, out: read_query_into(source, qids[i], out),
                self.threads,
            )
        row = {v: i for i, v in enumerate(vids)}
        return Batch(
            video=video_tokens,
            video_mask=video_mask,
            video_index=torch.tensor([row[q.vid] for q in queries], dtype=torch.long, pin_memory=pin),
            query=query,
            query_mask=query_mask,
            fps=torch.tensor([source.video_fps(v) for v in vids], dtype=torch.float32, pin_memory=pin),
            queries=list(queries),
            vids=list(vids),
        )
