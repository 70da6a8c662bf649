"""The feature store: CLIP tokens, query tokens and annotations of one dataset in a Zarr v3 group.

One store per (dataset, backbone, fps, layers). Layout (see ``docs/store.md``)::

    <store>/zarr.json                root group; its attributes are the :class:`Manifest`
    <store>/videos/<vid>/            one float16 array (T, k, P, C) per video, ONE uncompressed
                                     chunk ``c.0.0.0.0`` = raw little-endian bytes; attributes
                                     ``vid``, ``fps``, ``num_clips``, ``crc32``
    <store>/queries/<part>/          float16 array (N_tokens, k, Cq): the query tokens of one
                                     ``write_queries`` call concatenated on axis 0, chunked by rows;
                                     attributes ``qids`` and ``lengths`` (tokens per query), ``crc32``
    <store>/annotations/             group; attribute ``queries`` = list of :class:`Query` dicts
    <store>/_staging/                scratch space of writers (temporary data, never read); its
                                     ``zarr.json`` carries the writer lock (``flock``, annotations)

A store whose manifest says ``dtype: int8`` holds the same arrays as packed int8 (T, k, P, C + 2) and
(N_tokens, k, Cq + 2): each token's int8 values, then the bytes of its float16 scale
(:mod:`shards.quant`). Its reads give float16 tokens all the same, dequantized into the caller's
buffer; :meth:`FeatureStore.read_stored` and :meth:`FeatureStore.map_stored` give them as stored.

This module is the typed facade (:class:`FeatureStore`, :func:`open_store`, :func:`create_store`).
The manifest and its identity checks live in :mod:`shards.manifest`, the raw chunk I/O in
:mod:`shards.rawarray`, the staged atomic commits in :mod:`shards.staging`; the names callers
need from them are re-exported here (see ``__all__``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from shards.errors import StoreError, option
from shards.manifest import FORMAT_VERSION, Manifest, check_expected, make_manifest, package_version
from shards.paths import unsafe_id_reason
from shards.quant import DTYPES, dequantize_packed, pack, stored_dtype
from shards.rawarray import DTYPE, RawArray, crc32_hex, fsync_path, write_raw_array
from shards.schema import Query
from shards.staging import Staging
from shards.tokens import check_finite

__all__ = [
    "ANNOTATIONS",
    "DTYPE",
    "FORMAT_VERSION",
    "QUERIES",
    "QUERY_CHUNK_BYTES",
    "STAGING",
    "VIDEOS",
    "FeatureStore",
    "Manifest",
    "RawArray",
    "check_id",
    "crc32_hex",
    "create_store",
    "make_manifest",
    "open_store",
    "package_version",
]

VIDEOS, QUERIES, ANNOTATIONS, STAGING = "videos", "queries", "annotations", "_staging"
QUERY_CHUNK_BYTES = 4 << 20
"""Target size of one chunk of a query-token part (rows of ``k * Cq`` tokens as stored)."""


def check_id(name: str, what: str) -> str:
    """Return ``name`` if it is usable as a store key, else raise :class:`StoreError`."""
    if not isinstance(name, str):
        raise StoreError(f"{what} id {name!r} must be a string")
    reason = "the name is reserved by zarr" if name == "zarr.json" else unsafe_id_reason(name)
    if reason is not None:
        raise StoreError(f"{what} id {name!r} cannot be a store key: {reason}")
    return name


def _check_qid(qid: Any) -> int | str:
    if isinstance(qid, bool) or not isinstance(qid, int | str | np.integer):
        raise StoreError(f"query id {qid!r} must be an int or a string")
    return int(qid) if isinstance(qid, np.integer) else qid


def _as_tokens(array: Any, what: str, ndim: int, tail: tuple[int, ...], tail_names: str) -> np.ndarray:
    """Validate ``array`` as ``(N, *tail)`` floats; return it as contiguous little-endian float16."""
    arr = np.asarray(array)
    if arr.ndim != ndim or tuple(arr.shape[1:]) != tail or arr.shape[0] < 1:
        raise StoreError(
            f"{what} has shape {tuple(arr.shape)}, the store needs (N, {tail_names}) = (N, "
            f"{', '.join(map(str, tail))}) with N >= 1"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise StoreError(f"{what} has dtype {arr.dtype}, the store needs float16 tokens")
    return np.ascontiguousarray(arr, dtype=DTYPE)


def _output(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """``out`` checked to be a writeable C-contiguous float16 array of ``shape`` (:class:`ValueError`
    otherwise), or a new one when ``None``."""
    if out is None:
        return np.empty(shape, DTYPE)
    if out.shape != shape or out.dtype != DTYPE or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(
            f"out must be a writeable C-contiguous float16 array of shape {shape}, "
            f"got {out.dtype} {out.shape}"
        )
    return out


class FeatureStore:
    """Typed access to a store on disk. Obtain one with :func:`create_store` or :func:`open_store`.

    Reads work in any mode; writes need ``mode='a'``. Per-video metadata and the query index are
    cached per process (cheap to rebuild; no file handles are kept open, so a store object may be
    passed to forked worker processes). With ``verify_reads`` (default) every token read checks the
    CRC-32 of the chunks it reads (:meth:`shards.rawarray.RawArray.check_rows`).

    Token reads give float16 whatever the store's ``dtype`` (an int8 store's tokens are dequantized
    into the caller's buffer; ``quantized`` says which); :meth:`read_stored` / :meth:`map_stored` give
    a video as stored (the loaders and the token cache keep int8 tokens and dequantize when they
    assemble a batch).
    """

    def __init__(
        self, path: Path, manifest: Manifest, *, writable: bool, fsync: bool = True, verify_reads: bool = True
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.writable = writable
        self.fsync = fsync
        self.verify_reads = verify_reads
        self.quantized = manifest.dtype == "int8"
        self._staging = Staging(path / STAGING, fsync)
        self._videos: dict[str, RawArray] = {}
        self._query_index: dict[int | str, tuple[RawArray, int, int]] | None = None

    def __repr__(self) -> str:
        m = self.manifest
        return f"FeatureStore({str(self.path)!r}, dataset={m.dataset!r}, backbone={m.backbone!r})"

    # ---- videos

    def video_ids(self) -> list[str]:
        """Ids of all completely written videos, sorted."""
        with os.scandir(self.path / VIDEOS) as entries:
            return sorted(
                e.name for e in entries if e.is_dir() and os.path.isfile(os.path.join(e.path, "zarr.json"))
            )

    def has_video(self, vid: str) -> bool:
        """Whether video ``vid`` is completely written."""
        return (self.path / VIDEOS / vid / "zarr.json").is_file()

    def video_array(self, vid: str) -> RawArray:
        """The validated array of video ``vid`` (cached); :class:`StoreError` if absent."""
        arr = self._videos.get(vid)
        if arr is None:
            path = self.path / VIDEOS / vid
            if not (path / "zarr.json").is_file():
                raise StoreError(f"video {vid!r} is not in store {self.path} (never written or incomplete)")
            arr = RawArray.load(path)
            shape, dtype = self.manifest.stored_video_shape, stored_dtype(self.manifest.dtype)
            if len(arr.shape) != 4 or arr.shape[1:] != shape or arr.dtype != dtype:
                raise StoreError(
                    f"video {vid!r} in {self.path} is {arr.dtype} of shape {arr.shape}, the manifest says "
                    f"{dtype} (T, {', '.join(map(str, shape))})"
                )
            self._videos[vid] = arr
        return arr

    def video_length(self, vid: str) -> int:
        """T, the number of clips of video ``vid`` (reads metadata only)."""
        return self.video_array(vid).shape[0]

    def video_fps(self, vid: str) -> float:
        """Clips per second of video ``vid``."""
        return float(self.video_array(vid).attrs["fps"])

    def video_duration(self, vid: str) -> float:
        """Decoded length of video ``vid`` in seconds: ``T / fps`` (wins over annotated durations)."""
        return self.video_length(vid) / self.video_fps(vid)

    def video_nbytes(self, vid: str) -> int:
        """Bytes of the tokens of video ``vid`` as stored (an int8 store's: about half of float16)."""
        return self.video_array(vid).nbytes

    def query_nbytes(self, qid: int | str) -> int:
        """Bytes of the tokens of query ``qid`` as stored."""
        part, _, length = self._query_entry(qid)
        return length * part.row_nbytes

    def _layers(self, layers: int | None) -> int:
        """The number of last layers a read keeps (``None``: all); :class:`ValueError` outside 1..k."""
        stored = self.manifest.layers
        keep = stored if layers is None else int(layers)
        if not 1 <= keep <= stored:
            raise ValueError(f"layers must be in 1..{stored} (the stored layers), got {layers}")
        return keep

    def read_video(self, vid: str, out: np.ndarray | None = None, layers: int | None = None) -> np.ndarray:
        """Tokens ``(T, k, P, C)`` float16 of video ``vid``, read into ``out`` when given.

        ``out`` must be a C-contiguous, writeable float16 array of exactly that shape (e.g. the
        first ``T`` clips of a row of a preallocated padded batch); :class:`ValueError` otherwise.
        The bytes go from the file straight into ``out``: there is no intermediate buffer (an int8
        store's tokens are dequantized from the mapped file into ``out``).

        ``layers``: only the last ``layers`` of the ``k`` stored layers, ``(T, layers, P, C)``
        (:meth:`shards.rawarray.RawArray.read_slab`: just their bytes when reads are not verified).
        """
        arr = self.video_array(vid)
        keep = self._layers(layers)
        out = _output(out, (arr.shape[0], keep, *self.manifest.video_shape[1:]))
        if self.quantized:
            stored = self.map_stored(vid) if keep == arr.shape[1] else self.read_stored(vid, keep)
            return dequantize_packed(stored, out)
        return self._read_rows(vid, arr, keep, out)

    def _read_rows(self, vid: str, arr: RawArray, keep: int, out: np.ndarray) -> np.ndarray:
        """The last ``keep`` layers of video ``vid`` (array ``arr``) as stored, into ``out``."""
        stored = arr.shape[1]
        if keep == stored:
            return arr.read_rows(0, arr.shape[0], out, self._checked(f"video {vid!r}"))
        return arr.read_slab(stored - keep, out, self._checked(f"video {vid!r}"))

    def read_stored(self, vid: str, layers: int | None = None) -> np.ndarray:
        """The last ``layers`` (``None``: all) layers of video ``vid`` as stored, in a new array: float16
        ``(T, layers, P, C)``, or packed int8 ``(T, layers, P, C + 2)`` in an int8 store (dequantize
        with :func:`shards.quant.dequantize_packed`)."""
        arr = self.video_array(vid)
        keep = self._layers(layers)
        return self._read_rows(vid, arr, keep, np.empty((arr.shape[0], keep, *arr.shape[2:]), arr.dtype))

    def map_stored(self, vid: str) -> np.ndarray:
        """Read-only tokens of video ``vid`` as stored (see :meth:`read_stored`), mapped from the page
        cache without a copy.

        The loader's read: the pages are read in by this call (so a background thread takes the
        disk wait), and copying (or dequantizing) from the result then costs what it costs from RAM.
        The mapping stays valid if the video is rewritten meanwhile (rename keeps the old file alive).
        Arrays not in the fast layout are read with :meth:`read_stored`.
        """
        mapped = self.video_array(vid).map(self._checked(f"video {vid!r}"))
        return mapped if mapped is not None else self.read_stored(vid)

    def map_video(self, vid: str) -> np.ndarray:
        """Tokens ``(T, k, P, C)`` float16 of video ``vid``: the read-only mapping of :meth:`map_stored`
        in a float16 store, a new dequantized array in an int8 store."""
        return self.read_video(vid) if self.quantized else self.map_stored(vid)

    def write_video(self, vid: str, tokens: np.ndarray, fps: float) -> None:
        """Write the tokens ``(T, k, P, C)`` of video ``vid`` sampled at ``fps`` clips per second (as
        float16, or quantized to int8 in an int8 store: :func:`shards.quant.pack`).

        Atomic: the video is staged and renamed into place, so it is either absent or complete;
        an existing video is replaced. Staging data of ``vid`` whose writer is provably gone (a
        killed earlier write) is removed first. Safe to call from several processes or hosts at once;
        for one video written twice at once, the last commit wins.
        """
        self._require_writable()
        check_id(vid, "video")
        check_finite(tokens, f"tokens of video {vid!r}")
        m = self.manifest
        data = self._encode(_as_tokens(tokens, f"tokens of video {vid!r}", 4, m.video_shape, "k, P, C"))
        fps = float(fps)
        if not math.isfinite(fps) or fps <= 0:
            raise StoreError(f"video {vid!r}: fps must be a positive number, got {fps}")
        if m.fps is not None and not math.isclose(fps, m.fps, rel_tol=1e-6):
            raise StoreError(f"video {vid!r}: fps {fps} differs from the store's fps {m.fps}")
        label = f"video.{vid}"
        with self._staging.stage(label) as tmp:
            attrs = {"vid": vid, "fps": fps, "num_clips": int(data.shape[0])}
            write_raw_array(tmp, [data], m.stored_video_shape, data.shape[0], attrs, self.fsync)
            self._staging.commit_dir(tmp, self.path / VIDEOS / vid, label)
        self._videos.pop(vid, None)

    # ---- queries

    def _index(self) -> dict[int | str, tuple[RawArray, int, int]]:
        if self._query_index is None:
            index: dict[int | str, tuple[RawArray, int, int]] = {}
            for part in self.query_parts():
                start = 0
                for qid, length in zip(part.attrs["qids"], part.attrs["lengths"], strict=True):
                    index[qid] = (part, start, int(length))
                    start += int(length)
            self._query_index = index
        return self._query_index

    def _query_part_names(self) -> list[str]:
        with os.scandir(self.path / QUERIES) as entries:
            return sorted(e.name for e in entries if e.is_dir())

    def query_parts(self) -> list[RawArray]:
        """The query-token parts, oldest first (a later part wins for a repeated query id).

        A part that a writer collects (superseded) between the listing and its loading is listed again.
        """
        while True:
            names = self._query_part_names()
            try:
                return [RawArray.load(self.path / QUERIES / name) for name in names]
            except StoreError:
                if all((self.path / QUERIES / name).is_dir() for name in names):
                    raise

    def query_ids(self) -> list[int | str]:
        """Ids of all queries that have tokens, in order of first write."""
        return list(self._index())

    def has_query(self, qid: int | str) -> bool:
        """Whether query ``qid`` has tokens."""
        return qid in self._index()

    def query_length(self, qid: int | str) -> int:
        """L, the number of tokens of query ``qid`` (metadata only)."""
        return self._query_entry(qid)[2]

    def _query_entry(self, qid: int | str) -> tuple[RawArray, int, int]:
        try:
            return self._index()[qid]
        except KeyError:
            raise StoreError(f"query {qid!r} has no tokens in store {self.path}") from None

    def read_query(self, qid: int | str, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens ``(L, k, Cq)`` float16 of query ``qid``, read into ``out`` when given (same rules as
        for :meth:`read_video`; an int8 store's are dequantized into ``out``). A cached index entry
        whose part a writer has collected since (the query was rewritten into a newer part) is looked
        up again."""
        part = self._query_entry(qid)[0]
        try:
            return self._read_query(qid, out)
        except StoreError:
            if part.path.is_dir():
                raise
        self._query_index = None
        return self._read_query(qid, out)

    def _read_query(self, qid: int | str, out: np.ndarray | None) -> np.ndarray:
        part, start, length = self._query_entry(qid)
        out = _output(out, (length, *self.manifest.query_shape))
        check = self._checked(f"query {qid!r}")
        if not self.quantized:
            return part.read_rows(start, start + length, out, check)
        stored = part.read_rows(start, start + length, np.empty((length, *part.shape[1:]), part.dtype), check)
        return dequantize_packed(stored, out)

    def write_queries(self, qids: Sequence[int | str], tokens: Sequence[np.ndarray]) -> None:
        """Write the tokens ``(L_i, k, Cq)`` of the queries ``qids`` as one new part (atomic).

        A query id written again is replaced (the part whose name sorts last wins: names start with
        the time of the write); parts whose every query lives in a later part are then deleted.
        Safe for several writing processes or hosts at once (no part another writer may still need
        is deleted: a superseded part stays superseded whatever is written later); repeating a call
        after a crash is safe.
        """
        self._require_writable()
        if len(qids) != len(tokens):
            raise StoreError(f"write_queries got {len(qids)} ids but {len(tokens)} token arrays")
        for qid, array in zip(qids, tokens, strict=True):
            check_finite(array, f"tokens of query {qid!r}")
        if not qids:
            return
        ids = [_check_qid(q) for q in qids]
        if len(set(ids)) != len(ids):
            raise StoreError("write_queries got a query id twice in one call")
        m = self.manifest
        blocks = [
            self._encode(_as_tokens(t, f"tokens of query {q!r}", 3, m.query_shape, "k, Cq"))
            for q, t in zip(ids, tokens, strict=True)
        ]
        row_nbytes = blocks[0][0].nbytes
        total = sum(b.shape[0] for b in blocks)
        chunk_rows = min(max(1, QUERY_CHUNK_BYTES // row_nbytes), total)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        with self._staging.stage("queries") as tmp:
            attrs = {"qids": ids, "lengths": [b.shape[0] for b in blocks]}
            write_raw_array(tmp, blocks, m.stored_query_shape, chunk_rows, attrs, self.fsync)
            self._staging.commit_dir(tmp, self.path / QUERIES / name, "queries")
        self._query_index = None
        self._collect_superseded_parts()

    def _collect_superseded_parts(self) -> None:
        """Delete the parts whose every query id also is in a part with a later name (never read again).

        Lock-free: more parts can only supersede more, so concurrent writers agree on what is dead;
        a part is moved out of ``queries/`` in one rename, so a reader sees it whole or not at all.
        """
        later: set[int | str] = set()
        for part in reversed(self.query_parts()):
            qids = part.attrs["qids"]
            if all(q in later for q in qids):
                self._staging.discard(part.path, "queries")
            later.update(qids)

    # ---- annotations

    def annotations(self) -> list[Query]:
        """All stored annotations (normalized :class:`Query` records), in write order."""
        meta = read_metadata(self.path / ANNOTATIONS / "zarr.json", self.path)
        return [Query.from_dict(d) for d in meta.get("attributes", {}).get("queries", [])]

    def write_annotations(self, queries: Sequence[Query]) -> None:
        """Merge ``queries`` into the stored annotations by ``qid`` (a new record replaces an old one).

        Atomic: the group metadata is staged and renamed over the old one. Safe for several writing
        processes or hosts at once: the read-merge-replace runs under the store's writer lock
        (:meth:`shards.staging.Staging.lock`), so no writer's records are lost; readers need no lock.
        """
        self._require_writable()
        for q in queries:
            _check_qid(q.qid)
            check_id(q.vid, "video")
        with self._staging.lock():
            merged = {q.qid: q for q in self.annotations()}
            merged.update((q.qid, q) for q in queries)
            with self._staging.stage("annotations") as tmp:
                zarr.open_group(
                    str(tmp), mode="w", attributes={"queries": [q.to_dict() for q in merged.values()]}
                )
                self._staging.commit_file(tmp / "zarr.json", self.path / ANNOTATIONS / "zarr.json")

    # ---- staging

    def staging_entries(self) -> list[str]:
        """Names of leftover staging entries (writes in progress or killed), sorted."""
        return self._staging.entries()

    def _encode(self, tokens: np.ndarray) -> np.ndarray:
        """float16 ``tokens`` as this store holds them: as they are, or packed int8 (:mod:`shards.quant`)."""
        return pack(tokens) if self.quantized else tokens

    def _checked(self, what: str) -> str | None:
        """``what`` to check a read against the stored CRC-32 (``verify_reads``), else ``None``."""
        return what if self.verify_reads else None

    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"store {self.path} is open read-only; open it with mode='a' to write")


# --------------------------------------------------------------------------------------- open / create


def read_metadata(meta_file: Path, store: Path) -> dict[str, Any]:
    """The JSON object in the metadata file ``meta_file`` (a ``zarr.json``) of the store at ``store``.

    Raises:
        StoreError: the file cannot be read, or holds no JSON object (truncated, corrupt); the message
            names the file and what to do.
    """
    try:
        meta = json.loads(meta_file.read_bytes())
    except OSError as err:
        raise StoreError(f"cannot read {meta_file}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        problem = f"{err.msg}: line {err.lineno} column {err.colno}"
    except (ValueError, RecursionError):  # not UTF-8, or nested too deeply
        problem = "not UTF-8 JSON or nested too deeply"
    else:
        if isinstance(meta, dict):
            return meta
        problem = "not a JSON object"
    raise StoreError(
        f"{meta_file} is truncated or corrupt ({problem}): the store {store} cannot be used as is; "
        "restore the file from a copy, or re-create the store (`r2 extract` or `r2 shards import-*` "
        "into a new --out)"
    )


def _read_root(path: Path) -> dict[str, Any]:
    """Root attributes of the store at ``path``; :class:`StoreError` if it is not a store."""
    if not path.exists():
        way = option("`r2 extract` or `r2 shards import-npy`", "`make extract`, or give STORE=PATH")
        raise StoreError(f"no feature store at {path}: the path does not exist (create one with {way})")
    meta_file = path / "zarr.json"
    if not meta_file.is_file():
        raise StoreError(f"{path} is not a feature store: it has no zarr.json (not a Zarr v3 group)")
    meta = read_metadata(meta_file, path)
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise StoreError(f"{path} is not a feature store: zarr.json does not describe a Zarr v3 group")
    attrs = meta.get("attributes", {})
    if "format_version" not in attrs:
        raise StoreError(f"{path} is a Zarr group but not a feature store: its attributes hold no manifest")
    if attrs["format_version"] != FORMAT_VERSION:
        raise StoreError(
            f"store {path} has format version {attrs['format_version']}, this package reads version "
            f"{FORMAT_VERSION}: re-create the store with this version"
        )
    if attrs.get("dtype") not in DTYPES:
        raise StoreError(
            f"store {path} holds {attrs.get('dtype')!r} tokens, this package reads {' or '.join(DTYPES)} "
            "stores: re-create the store with this version"
        )
    missing = [n for n in (VIDEOS, QUERIES, ANNOTATIONS, STAGING) if not (path / n / "zarr.json").is_file()]
    if missing:
        raise StoreError(f"store {path} is damaged: group(s) {', '.join(missing)} are missing")
    return attrs


def open_store(
    path: str | Path,
    *,
    expect: dict[str, Any] | None = None,
    mode: str = "r",
    fsync: bool = True,
    verify_reads: bool = True,
) -> FeatureStore:
    """Open the store at ``path``.

    Args:
        path: store directory.
        expect: manifest fields the caller relies on, e.g. ``{'backbone': ..., 'weights_sha256': ...,
            'fps': ..., 'layers': ...}``; any difference raises :class:`StoreError` naming both values.
        mode: ``'r'`` (read only) or ``'a'`` (read and write).
        fsync: flush written files to disk before committing them (writes only).
        verify_reads: check every token read against the stored CRC-32 of its chunks (a mismatch
            raises :class:`StoreError`); ``False`` only for a store ``r2 shards verify`` reported ok.
    """
    if mode not in ("r", "a"):
        raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
    path = Path(path)
    attrs = _read_root(path)
    manifest = Manifest.from_attrs(attrs, path)
    if expect:
        check_expected(path, attrs, expect)
    return FeatureStore(path, manifest, writable=mode == "a", fsync=fsync, verify_reads=verify_reads)


def create_store(path: str | Path, manifest: Manifest, *, fsync: bool = True) -> FeatureStore:
    """Create a store at ``path``, or open the existing one if its manifest matches (mode ``'a'``).

    Creation is atomic (built under a temporary name, flushed with ``fsync``, then renamed), so
    concurrent creators on a shared file system end up with one store, the first one renamed in,
    which all of them open. A mismatching existing store raises :class:`StoreError` naming the
    differing fields; the creation time and package version are not compared.
    """
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            root = zarr.open_group(str(tmp), mode="w-", attributes=manifest.to_attrs())
            for name in (VIDEOS, QUERIES, STAGING):
                root.create_group(name)
            root.create_group(ANNOTATIONS, attributes={"queries": []})
            if fsync:
                for group in (*(tmp / name for name in (VIDEOS, QUERIES, ANNOTATIONS, STAGING)), tmp):
                    fsync_path(group / "zarr.json")
                    fsync_path(group)
            with contextlib.suppress(OSError):
                os.rename(tmp, path)
                if fsync:
                    fsync_path(path.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return open_store(path, expect=manifest.identity(), mode="a", fsync=fsync)
