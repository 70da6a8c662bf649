"""Where a loader's tokens come from: the :class:`TokenSource` protocol (a feature store, the token
cache, or :class:`MemorySource` for tests and benchmarks), sources that keep tokens on the GPU
(:class:`DeviceTokens`), and the queries a loader serves (:func:`select_queries`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from shards.schema import Query
from shards.store import FeatureStore, Manifest

Tokens = TypeVar("Tokens", np.ndarray, torch.Tensor)


class TokenSource(Protocol):
    """What the loader reads: implemented by :class:`FeatureStore`, :class:`MemorySource` and
    :class:`train.data.cache.TokenCache`. ``read_video(vid, layers=n)`` gives the last ``n`` layers.

    ``read_video``, ``map_video`` and ``read_query`` give float16 tokens; ``read_stored`` and
    ``map_stored`` give a video as stored (float16, or packed int8 of an int8 store: :mod:`shards.quant`),
    which :func:`copy_tokens` writes into a float16 batch row. ``video_nbytes`` counts bytes as stored.
    """

    manifest: Manifest

    def video_ids(self) -> list[str]: ...
    def video_length(self, vid: str) -> int: ...
    def video_fps(self, vid: str) -> float: ...
    def video_nbytes(self, vid: str) -> int: ...
    def read_video(
        self, vid: str, out: np.ndarray | None = None, layers: int | None = None
    ) -> np.ndarray: ...
    def map_video(self, vid: str) -> np.ndarray: ...
    def read_stored(self, vid: str, layers: int | None = None) -> np.ndarray: ...
    def map_stored(self, vid: str) -> np.ndarray: ...
    def has_query(self, qid: int | str) -> bool: ...
    def query_length(self, qid: int | str) -> int: ...
    def read_query(self, qid: int | str, out: np.ndarray | None = None) -> np.ndarray: ...
    def annotations(self) -> list[Query]: ...


@runtime_checkable
class DeviceTokens(Protocol):
    """A token source that may keep its tokens on a GPU (:class:`train.data.cache.TokenCache`): when
    ``on_device``, batches are gathered on ``device`` from :meth:`video_tensor` (videos as stored) /
    :meth:`query_tensor` (float16)."""

    @property
    def on_device(self) -> bool: ...
    @property
    def device(self) -> torch.device: ...
    def video_tensor(self, vid: str) -> torch.Tensor: ...
    def query_tensor(self, qid: int | str) -> torch.Tensor: ...


def device_tokens(source: object) -> DeviceTokens | None:
    """``source`` when it keeps its tokens on a GPU (batches are gathered there), else ``None``."""
    return source if isinstance(source, DeviceTokens) and source.on_device else None


def last_layers(tokens: Tokens, layers: int) -> Tokens:
    """The last ``layers`` entries of axis 1 (the layers of ``(T, k, ...)`` tokens): a view, strided
    when ``layers < k``."""
    return tokens[:, tokens.shape[1] - layers :]


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

    def read_video(self, vid: str, out: np.ndarray | None = None, layers: int | None = None) -> np.ndarray:
        """The stored array itself (no copy; a view of its last ``layers`` layers) or a copy into ``out``."""
        tokens = self._videos[vid]
        if layers is not None:
            tokens = last_layers(tokens, layers)
        if out is None:
            return tokens
        out[...] = tokens
        return out

    def map_video(self, vid: str) -> np.ndarray:
        """The stored array itself (no copy)."""
        return self._videos[vid]

    def read_stored(self, vid: str, layers: int | None = None) -> np.ndarray:
        """The stored array (float16: this source holds no int8 tokens), its last ``layers`` layers."""
        return self.read_video(vid, layers=layers)

    def map_stored(self, vid: str) -> np.ndarray:
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
