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
    <store>/_staging/                scratch space of writers (temporary data, never read)

Every write is staged under ``_staging/`` and committed with one atomic ``rename`` (a directory
for a video or a query part, ``zarr.json`` for the annotations), so a killed writer never leaves a
video that looks complete, and several processes (or hosts sharing the file system) can write
disjoint videos at once. The reader bypasses zarr's async pipeline: it validates each array's
``zarr.json`` and reads the raw chunk bytes straight into a preallocated buffer; arrays whose
metadata differs (e.g. re-encoded by someone else with a compressor) are read through zarr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import math
import mmap
import os
import shutil
import socket
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec

from shards.errors import StoreError
from shards.paths import unsafe_id_reason
from shards.schema import Query

FORMAT_VERSION = 1
"""Version of the on-disk layout; a store of another version is refused on open."""

VIDEOS, QUERIES, ANNOTATIONS, STAGING = "videos", "queries", "annotations", "_staging"
DTYPE = np.dtype("<f2")
QUERY_CHUNK_BYTES = 4 << 20
"""Target size of one chunk of a query-token part (rows of ``k * Cq`` float16 values)."""

_CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_IDENTITY_FIELDS = (
    "format_version",
    "backbone",
    "pretrained",
    "weights_sha256",
    "layers",
    "frame_size",
    "fps",
    "dtype",
    "video_tokens",
    "video_width",
    "text_width",
    "dataset",
)


@dataclass
class Manifest:
    """Provenance and geometry of a store; stored as the root group's attributes.

    Attributes:
        format_version: on-disk layout version (:data:`FORMAT_VERSION`).
        backbone: open_clip model name, e.g. ``ViT-B-32``.
        pretrained: ``openai``, a weights file path, or ``random:<seed>``.
        weights_sha256: checksum of the backbone weights (``unknown`` for imported caches).
        layers: k, the number of last transformer blocks kept.
        frame_size: input resolution of the image tower in pixels (224 / 336).
        fps: frames sampled per second, ``None`` = per-video rate (see :meth:`FeatureStore.video_fps`).
        dtype: token dtype, ``float16``.
        video_tokens: P, tokens per frame (CLS first).
        video_width: C, width of the image tower.
        text_width: Cq, width of the text tower.
        dataset: dataset registry name.
        package_version: version of the package that created the store.
        created: creation time, ISO 8601.
    """

    format_version: int
    backbone: str
    pretrained: str
    weights_sha256: str
    layers: int
    frame_size: int
    fps: float | None
    dtype: str
    video_tokens: int
    video_width: int
    text_width: int
    dataset: str
    package_version: str
    created: str

    def to_attrs(self) -> dict[str, Any]:
        """The manifest as a JSON-able dict (the root attributes)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str | Path) -> Manifest:
        """Parse root attributes; :class:`StoreError` naming ``where`` if fields are missing."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in attrs]
        if missing:
            raise StoreError(f"store {where}: manifest lacks {', '.join(missing)}; the store is damaged")
        return cls(**{n: attrs[n] for n in names})

    @property
    def video_shape(self) -> tuple[int, int, int]:
        """``(k, P, C)``: shape of one clip's video tokens."""
        return (self.layers, self.video_tokens, self.video_width)

    @property
    def query_shape(self) -> tuple[int, int]:
        """``(k, Cq)``: shape of one query token."""
        return (self.layers, self.text_width)


def package_version() -> str:
    """Installed version of this toolkit (``0+unknown`` when not installed)."""
    try:
        return importlib.metadata.version("r2tuning-toolkit")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def make_manifest(
    *,
    dataset: str,
    backbone: str,
    pretrained: str,
    weights_sha256: str,
    layers: int,
    frame_size: int,
    fps: float | None,
    video_tokens: int,
    video_width: int,
    text_width: int,
) -> Manifest:
    """A :class:`Manifest` with format version, dtype, package version and creation time filled in."""
    return Manifest(
        format_version=FORMAT_VERSION,
        backbone=backbone,
        pretrained=pretrained,
        weights_sha256=weights_sha256,
        layers=int(layers),
        frame_size=int(frame_size),
        fps=None if fps is None else float(fps),
        dtype="float16",
        video_tokens=int(video_tokens),
        video_width=int(video_width),
        text_width=int(text_width),
        dataset=dataset,
        package_version=package_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _mismatches(path: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    diffs = [
        f"{key} is {stored.get(key)!r} in the store but {value!r} was expected"
        for key, value in wanted.items()
        if not _same(stored.get(key), value)
    ]
    if not diffs:
        return None
    return (
        f"store {path} does not match: " + "; ".join(diffs) + " (use another --out path or matching settings)"
    )


# --------------------------------------------------------------------------------------------- helpers


def clamp_query(query: Query, num_clips: int, fps: float) -> Query:
    """Return ``query`` with its moments clamped to the decoded video length ``num_clips / fps`` seconds.

    The decoded clip count ``T`` wins over the annotation's ``duration``: windows are cut to
    ``[0, T / fps]``, windows left empty are dropped, and ``duration`` becomes
    ``min(duration, T / fps)``. The input is not modified.
    """
    limit = num_clips / fps
    moments = [[max(0.0, float(s)), min(float(e), limit)] for s, e in query.moments]
    return dataclasses.replace(
        query,
        moments=[[s, e] for s, e in moments if e > s],
        duration=min(float(query.duration), limit),
    )


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


def crc32_hex(data: Any) -> str:
    """CRC-32 (zlib) of a bytes-like object, as 8 hex digits."""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` at ``offset``; returns the number of bytes read (short at EOF)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


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


# ------------------------------------------------------------------------------------------ raw arrays


@dataclass
class RawArray:
    """A zarr v3 array on local disk whose chunks are read as raw bytes when the metadata allows it.

    ``fast`` is true for float16 arrays with a regular grid chunked along axis 0 only, the single
    codec ``bytes`` (little endian) and no storage transformer: then chunk ``i`` is the file
    ``chunk_path(i)`` holding ``chunk_rows`` full rows (edge chunks are padded, as zarr writes them).
    Other arrays are read through ``zarr.open_array``.

    Attributes:
        path: directory of the array.
        shape: array shape; axis 0 is the row axis (clips or tokens).
        chunk_rows: rows per chunk along axis 0.
        attrs: the array's attributes.
        fast: whether the raw-byte path is used.
    """

    path: Path
    shape: tuple[int, ...]
    chunk_rows: int
    attrs: dict[str, Any]
    fast: bool
    _separator: str = "."
    _prefix: str = "c"

    @classmethod
    def load(cls, path: Path) -> RawArray:
        """Read and validate ``path/zarr.json``; :class:`StoreError` if it is not a float16 zarr v3 array."""
        meta_file = path / "zarr.json"
        try:
            meta = json.loads(meta_file.read_bytes())
        except FileNotFoundError:
            raise StoreError(f"{path} is not a zarr array (no zarr.json)") from None
        except (OSError, ValueError) as err:
            raise StoreError(f"{meta_file} is unreadable: {err}") from None
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
            raise StoreError(f"{meta_file} does not describe a zarr v3 array")
        if meta.get("data_type") != "float16":
            raise StoreError(f"{path}: dtype {meta.get('data_type')!r}, the store holds float16 tokens")
        shape = tuple(int(s) for s in meta["shape"])
        grid = meta.get("chunk_grid", {})
        chunks = tuple(grid.get("configuration", {}).get("chunk_shape", ()))
        encoding = meta.get("chunk_key_encoding", {})
        separator = encoding.get("configuration", {}).get(
            "separator", "/" if encoding.get("name") == "default" else "."
        )
        fast = (
            grid.get("name") == "regular"
            and len(chunks) == len(shape) >= 1
            and tuple(chunks[1:]) == shape[1:]
            and meta.get("codecs") == [{"name": "bytes", "configuration": {"endian": "little"}}]
            and not meta.get("storage_transformers")
            and encoding.get("name") in ("default", "v2")
        )
        return cls(
            path=path,
            shape=shape,
            chunk_rows=int(chunks[0]) if chunks else max(shape[0], 1),
            attrs=meta.get("attributes", {}),
            fast=fast,
            _separator=separator,
            _prefix="c" if encoding.get("name") == "default" else "",
        )

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row (one clip / one token)."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) * DTYPE.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the whole array, uncompressed."""
        return self.shape[0] * self.row_nbytes

    @property
    def num_chunks(self) -> int:
        """Number of chunks along axis 0."""
        return -(-self.shape[0] // self.chunk_rows)

    def chunk_path(self, index: int) -> Path:
        """File of chunk ``index`` along axis 0 (fast arrays only)."""
        coords = [str(index)] + ["0"] * (len(self.shape) - 1)
        key = self._separator.join(([self._prefix] if self._prefix else []) + coords)
        return self.path / key

    def read_rows(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Read rows ``[start, stop)`` into ``out`` (C-contiguous float16 of that shape) and return it."""
        if self.fast:
            view = memoryview(out).cast("B")
            row = self.row_nbytes
            pos = start
            while pos < stop:
                index = pos // self.chunk_rows
                end = min(stop, (index + 1) * self.chunk_rows)
                begin = (pos - start) * row
                want = (end - pos) * row
                chunk = self.chunk_path(index)
                try:
                    fd = os.open(chunk, os.O_RDONLY)
                except FileNotFoundError:
                    raise StoreError(f"chunk {chunk} is missing; run `r2 shards verify`") from None
                try:
                    got = _pread_into(fd, view[begin : begin + want], (pos - index * self.chunk_rows) * row)
                finally:
                    os.close(fd)
                if got != want:
                    raise StoreError(f"chunk {chunk} is truncated; run `r2 shards verify` and rewrite it")
                pos = end
        else:
            out[...] = zarr.open_array(self.path, mode="r")[start:stop]
        return out

    def map(self) -> np.ndarray | None:
        """The whole array as a read-only view of its mapped chunk file (single-chunk fast arrays only,
        else ``None``). The pages are read in by this call (``MAP_POPULATE`` where available)."""
        if not self.fast or self.num_chunks != 1:
            return None
        chunk = self.chunk_path(0)
        try:
            fd = os.open(chunk, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"chunk {chunk} is missing; run `r2 shards verify`") from None
        try:
            if os.fstat(fd).st_size < self.nbytes:
                raise StoreError(f"chunk {chunk} is truncated; run `r2 shards verify` and rewrite it")
            mapping = mmap.mmap(fd, self.nbytes, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        return np.frombuffer(mapping, DTYPE).reshape(self.shape)

    def chunk_checksums(self) -> list[str]:
        """CRC-32 of the little-endian bytes of the in-bounds rows of every chunk (reads everything)."""
        sums = []
        for index in range(self.num_chunks):
            start = index * self.chunk_rows
            stop = min(self.shape[0], start + self.chunk_rows)
            buf = np.empty((stop - start, *self.shape[1:]), DTYPE)
            sums.append(crc32_hex(memoryview(self.read_rows(start, stop, buf)).cast("B")))
        return sums


def _write_raw_array(
    path: Path,
    rows: Sequence[np.ndarray],
    tail: tuple[int, ...],
    chunk_rows: int,
    attrs: dict[str, Any],
    fsync: bool,
) -> None:
    """Write the row blocks ``rows`` (each ``(n_i, *tail)`` float16) as one zarr array at ``path``.

    The chunks are written as raw little-endian bytes (what zarr's ``bytes`` codec produces), the
    last one zero-padded to ``chunk_rows``; ``attrs`` gets ``crc32`` = per-chunk checksums of the
    in-bounds bytes. ``zarr.json`` is written last.
    """
    total = sum(r.shape[0] for r in rows)
    row_nbytes = int(np.prod(tail, dtype=np.int64)) * DTYPE.itemsize
    path.mkdir(parents=True, exist_ok=True)
    layout = RawArray(path, (total, *tail), chunk_rows, {}, True)
    sums: list[str] = []
    pending = [memoryview(r).cast("B") for r in rows]
    for index in range(layout.num_chunks):
        in_bounds = min(chunk_rows, total - index * chunk_rows) * row_nbytes
        crc = 0
        with open(layout.chunk_path(index), "wb") as f:
            need = in_bounds
            while need:
                piece = pending[0][:need]
                f.write(piece)
                crc = zlib.crc32(piece, crc)
                need -= len(piece)
                pending[0] = pending[0][len(piece) :]
                if not len(pending[0]):
                    pending.pop(0)
            if in_bounds < chunk_rows * row_nbytes:
                f.write(bytes(chunk_rows * row_nbytes - in_bounds))
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        sums.append(f"{crc & 0xFFFFFFFF:08x}")
    zarr.create_array(
        store=str(path),
        shape=(total, *tail),
        chunks=(chunk_rows, *tail),
        dtype="float16",
        compressors=None,
        filters=None,
        serializer=BytesCodec(endian="little"),
        fill_value=0,
        chunk_key_encoding=_CHUNK_KEY_ENCODING,
        attributes={**attrs, "crc32": sums},
        config={"write_empty_chunks": True},
    )
    if fsync:
        _fsync_path(path / "zarr.json")


# ------------------------------------------------------------------------------------------ the store


class FeatureStore:
    """Typed access to a store on disk. Obtain one with :func:`create_store` or :func:`open_store`.

    Reads work in any mode; writes need ``mode='a'``. Per-video metadata and the query index are
    cached per process (cheap to rebuild; no file handles are kept open, so a store object may be
    passed to forked worker processes).
    """

    def __init__(self, path: Path, manifest: Manifest, *, writable: bool, fsync: bool = True) -> None:
        self.path = path
        self.manifest = manifest
        self.writable = writable
        self.fsync = fsync
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
            if len(arr.shape) != 4 or arr.shape[1:] != self.manifest.video_shape:
                raise StoreError(
                    f"video {vid!r} in {self.path} has shape {arr.shape}, the manifest says "
                    f"(T, {', '.join(map(str, self.manifest.video_shape))})"
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
        """Bytes of the tokens of video ``vid``."""
        return self.video_array(vid).nbytes

    def read_video(self, vid: str, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens ``(T, k, P, C)`` float16 of video ``vid``, read into ``out`` when given.

        ``out`` must be a C-contiguous, writeable float16 array of exactly that shape (e.g. a row
        of a preallocated padded batch); :class:`ValueError` otherwise.
        """
        arr = self.video_array(vid)
        if out is None:
            out = np.empty(arr.shape, DTYPE)
        elif (
            out.shape != arr.shape
            or out.dtype != DTYPE
            or not out.flags.c_contiguous
            or not out.flags.writeable
        ):
            raise ValueError(
                f"out must be a writeable C-contiguous float16 array of shape {arr.shape}, "
                f"got {out.dtype} {out.shape}"
            )
        return arr.read_rows(0, arr.shape[0], out)

    def map_video(self, vid: str) -> np.ndarray:
        """Read-only tokens ``(T, k, P, C)`` of video ``vid`` mapped from the page cache, without a copy.

        The loader's read: the pages are read in by this call (so a background thread takes the
        disk wait), and copying from the result then costs what copying from RAM costs. The mapping
        stays valid if the video is rewritten meanwhile (rename keeps the old file alive). Arrays not
        in the fast layout are read with :meth:`read_video`.
        """
        arr = self.video_array(vid)
        mapped = arr.map()
        return mapped if mapped is not None else self.read_video(vid)

    def write_video(self, vid: str, tokens: np.ndarray, fps: float) -> None:
        """Write the tokens ``(T, k, P, C)`` of video ``vid`` sampled at ``fps`` clips per second.

        Atomic: the video is staged and renamed into place, so it is either absent or complete;
        an existing video is replaced. Stale staging data of ``vid`` (a killed earlier write) is
        removed first. Safe to call from several processes for disjoint videos.
        """
        self._require_writable()
        check_id(vid, "video")
        m = self.manifest
        data = _as_tokens(tokens, f"tokens of video {vid!r}", 4, m.video_shape, "k, P, C")
        fps = float(fps)
        if not math.isfinite(fps) or fps <= 0:
            raise StoreError(f"video {vid!r}: fps must be a positive number, got {fps}")
        if m.fps is not None and not math.isclose(fps, m.fps, rel_tol=1e-6):
            raise StoreError(f"video {vid!r}: fps {fps} differs from the store's fps {m.fps}")
        label = f"video.{vid}"
        self._remove_stale_staging(label)
        tmp = self._staging_dir(label)
        try:
            attrs = {"vid": vid, "fps": fps, "num_clips": int(data.shape[0])}
            _write_raw_array(tmp, [data], m.video_shape, data.shape[0], attrs, self.fsync)
            self._commit_dir(tmp, self.path / VIDEOS / vid, label)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._videos.pop(vid, None)

    # ---- queries

    def _index(self) -> dict[int | str, tuple[RawArray, int, int]]:
        if self._query_index is None:
            index: dict[int | str, tuple[RawArray, int, int]] = {}
            for name in sorted(self._query_parts()):
                part = RawArray.load(self.path / QUERIES / name)
                start = 0
                for qid, length in zip(part.attrs["qids"], part.attrs["lengths"], strict=True):
                    index[qid] = (part, start, int(length))
                    start += int(length)
            self._query_index = index
        return self._query_index

    def _query_parts(self) -> list[str]:
        with os.scandir(self.path / QUERIES) as entries:
            return [e.name for e in entries if e.is_dir()]

    def query_parts(self) -> list[RawArray]:
        """The query-token parts, oldest first (a later part wins for a repeated query id)."""
        return [RawArray.load(self.path / QUERIES / name) for name in sorted(self._query_parts())]

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

    def read_query(self, qid: int | str) -> np.ndarray:
        """Tokens ``(L, k, Cq)`` float16 of query ``qid``."""
        part, start, length = self._query_entry(qid)
        return part.read_rows(start, start + length, np.empty((length, *part.shape[1:]), DTYPE))

    def write_queries(self, qids: Sequence[int | str], tokens: Sequence[np.ndarray]) -> None:
        """Write the tokens ``(L_i, k, Cq)`` of the queries ``qids`` as one new part (atomic).

        A query id written again is replaced (the newest part wins); parts left without any live
        query are deleted. Meant for one writing process (the extraction driver); repeating a
        call after a crash is safe.
        """
        self._require_writable()
        if len(qids) != len(tokens):
            raise StoreError(f"write_queries got {len(qids)} ids but {len(tokens)} token arrays")
        if not qids:
            return
        ids = [_check_qid(q) for q in qids]
        if len(set(ids)) != len(ids):
            raise StoreError("write_queries got a query id twice in one call")
        m = self.manifest
        blocks = [
            _as_tokens(t, f"tokens of query {q!r}", 3, m.query_shape, "k, Cq")
            for q, t in zip(ids, tokens, strict=True)
        ]
        row_nbytes = m.layers * m.text_width * DTYPE.itemsize
        chunk_rows = max(1, QUERY_CHUNK_BYTES // row_nbytes)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        self._remove_stale_staging("queries")
        tmp = self._staging_dir("queries")
        try:
            attrs = {"qids": ids, "lengths": [b.shape[0] for b in blocks]}
            total = sum(b.shape[0] for b in blocks)
            _write_raw_array(tmp, blocks, m.query_shape, min(chunk_rows, total), attrs, self.fsync)
            self._commit_dir(tmp, self.path / QUERIES / name, "queries")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._query_index = None
        live = {entry[0].path.name for entry in self._index().values()}
        for old in self._query_parts():
            if old not in live:
                shutil.rmtree(self.path / QUERIES / old, ignore_errors=True)

    # ---- annotations

    def annotations(self) -> list[Query]:
        """All stored annotations (normalized :class:`Query` records), in write order."""
        meta = json.loads((self.path / ANNOTATIONS / "zarr.json").read_bytes())
        return [Query.from_dict(d) for d in meta.get("attributes", {}).get("queries", [])]

    def write_annotations(self, queries: Sequence[Query]) -> None:
        """Merge ``queries`` into the stored annotations by ``qid`` (a new record replaces an old one).

        Atomic: the group metadata is staged and renamed over the old one. One writing process.
        """
        self._require_writable()
        merged = {q.qid: q for q in self.annotations()}
        for q in queries:
            _check_qid(q.qid)
            check_id(q.vid, "video")
            merged[q.qid] = q
        self._remove_stale_staging("annotations")
        tmp = self._staging_dir("annotations")
        try:
            zarr.open_group(
                str(tmp), mode="w", attributes={"queries": [q.to_dict() for q in merged.values()]}
            )
            if self.fsync:
                _fsync_path(tmp / "zarr.json")
            os.replace(tmp / "zarr.json", self.path / ANNOTATIONS / "zarr.json")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- staging

    def staging_entries(self) -> list[str]:
        """Names of leftover staging entries (writes in progress or killed), sorted."""
        with os.scandir(self.path / STAGING) as entries:
            return sorted(e.name for e in entries if e.name != "zarr.json")

    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"store {self.path} is open read-only; open it with mode='a' to write")

    def _staging_dir(self, label: str) -> Path:
        """A new empty staging directory ``<label>+<host>-<pid>-<random>`` (labels: ``video.<vid>``,
        ``queries``, ``annotations``)."""
        tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        path = self.path / STAGING / f"{label}+{tag}"
        path.mkdir()
        return path

    def _remove_stale_staging(self, label: str) -> None:
        """Delete staging entries of ``label``, left by a killed writer of the same video / part."""
        for name in self.staging_entries():
            if name.rpartition("+")[0] == label:
                shutil.rmtree(self.path / STAGING / name, ignore_errors=True)

    def _commit_dir(self, tmp: Path, final: Path, label: str) -> None:
        """Rename ``tmp`` to ``final`` atomically; an existing ``final`` is moved aside and deleted."""
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            old = self._staging_dir(label)
            os.rename(final, old / "old")
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        if self.fsync:
            _fsync_path(final.parent)


# --------------------------------------------------------------------------------------- open / create


def _read_root(path: Path) -> dict[str, Any]:
    """Root attributes of the store at ``path``; :class:`StoreError` if it is not a store."""
    if not path.exists():
        raise StoreError(
            f"no feature store at {path}: the path does not exist "
            "(create one with `r2 extract` or `r2 shards import-npy`)"
        )
    meta_file = path / "zarr.json"
    if not meta_file.is_file():
        raise StoreError(f"{path} is not a feature store: it has no zarr.json (not a Zarr v3 group)")
    try:
        meta = json.loads(meta_file.read_bytes())
    except (OSError, ValueError) as err:
        raise StoreError(f"{meta_file} is unreadable: {err}") from None
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
    missing = [n for n in (VIDEOS, QUERIES, ANNOTATIONS, STAGING) if not (path / n / "zarr.json").is_file()]
    if missing:
        raise StoreError(f"store {path} is damaged: group(s) {', '.join(missing)} are missing")
    return attrs


def open_store(
    path: str | Path, *, expect: dict[str, Any] | None = None, mode: str = "r", fsync: bool = True
) -> FeatureStore:
    """Open the store at ``path``.

    Args:
        path: store directory.
        expect: manifest fields the caller relies on, e.g. ``{'backbone': ..., 'weights_sha256': ...,
            'fps': ..., 'layers': ...}``; any difference raises :class:`StoreError` naming both values.
        mode: ``'r'`` (read only) or ``'a'`` (read and write).
        fsync: flush written files to disk before committing them (writes only).
    """
    if mode not in ("r", "a"):
        raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
    path = Path(path)
    attrs = _read_root(path)
    manifest = Manifest.from_attrs(attrs, path)
    if expect:
        unknown = set(expect) - {f.name for f in dataclasses.fields(Manifest)}
        if unknown:
            raise ValueError(f"expect has unknown manifest fields: {sorted(unknown)}")
        message = _mismatches(path, attrs, expect)
        if message:
            raise StoreError(message)
    return FeatureStore(path, manifest, writable=mode == "a", fsync=fsync)


def create_store(path: str | Path, manifest: Manifest, *, fsync: bool = True) -> FeatureStore:
    """Create a store at ``path``, or open the existing one if its manifest matches (mode ``'a'``).

    Creation is atomic (built under a temporary name, then renamed), so concurrent creators on a
    shared file system end up with one store. A mismatching existing store raises
    :class:`StoreError` naming the differing fields; the creation time and package version are
    not compared.
    """
    path = Path(path)
    wanted = {k: v for k, v in manifest.to_attrs().items() if k in _IDENTITY_FIELDS}
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            root = zarr.open_group(str(tmp), mode="w-", attributes=manifest.to_attrs())
            for name in (VIDEOS, QUERIES, STAGING):
                root.create_group(name)
            root.create_group(ANNOTATIONS, attributes={"queries": []})
            with contextlib.suppress(OSError):
                os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return open_store(path, expect=wanted, mode="a", fsync=fsync)
