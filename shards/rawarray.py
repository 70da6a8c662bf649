"""Raw I/O of the store's zarr v3 token arrays (float16, or packed int8: :mod:`shards.quant`): chunk
files read and written as plain bytes.

The store writes every array with one ``bytes`` codec (little endian), no compressor, a regular
grid chunked along axis 0 only. A chunk file then *is* the rows it holds, so this module reads
rows with ``preadv`` straight into the caller's buffer (a row of a padded batch, say) or maps
them, without zarr's codec pipeline. Arrays whose metadata
says otherwise (re-encoded with a compressor by someone else) are read through ``zarr``.
Writes produce exactly the files zarr would, plus a CRC-32 per chunk in the attributes; reads
check them when asked (``check=``, what the store's readers do by default).
"""

from __future__ import annotations

import json
import mmap
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec

from shards.errors import StoreError
from shards.quant import unpack

if TYPE_CHECKING:
    from zarr.core.chunk_key_encodings import ChunkKeyEncodingParams

DTYPE = np.dtype("<f2")
"""Token dtype in memory (and on disk, in a float16 store): little-endian float16."""
DATA_TYPES: dict[str, np.dtype] = {"float16": DTYPE, "int8": np.dtype("i1")}
"""zarr ``data_type`` -> numpy dtype of the arrays a store holds (int8: packed tokens, see
:mod:`shards.quant`)."""

_CHUNK_KEY_ENCODING: ChunkKeyEncodingParams = {"name": "default", "separator": "."}
_FAST_CODECS = (
    [{"name": "bytes", "configuration": {"endian": "little"}}],
    [{"name": "bytes"}],  # how zarr writes it for one-byte types (int8), which have no byte order
)
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _hex(crc: int) -> str:
    return f"{crc & 0xFFFFFFFF:08x}"


def crc32_hex(data: Any) -> str:
    """CRC-32 (zlib) of a bytes-like object, as 8 hex digits."""
    return _hex(zlib.crc32(data))


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file or a directory) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_chunk(chunk: Path) -> int:
    try:
        return os.open(chunk, os.O_RDONLY)
    except FileNotFoundError:
        raise StoreError(f"chunk {chunk} is missing; run `r2 shards verify`") from None


def _truncated(chunk: Path) -> StoreError:
    return StoreError(f"chunk {chunk} is truncated; run `r2 shards verify` and rewrite it")


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` at byte ``offset``; returns the number of bytes read (short at EOF)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


@dataclass
class RawArray:
    """A zarr v3 array (:data:`DATA_TYPES`) on local disk whose chunks are read as raw bytes when the
    metadata allows.

    ``fast`` is true for arrays with a regular grid chunked along axis 0 only, the single codec
    ``bytes`` (little endian) and no storage transformer: then chunk ``i`` is the file
    ``chunk_path(i)`` holding ``chunk_rows`` full rows (the last one zero-padded, as zarr writes it).
    Other arrays are read through ``zarr.open_array``.

    Attributes:
        path: directory of the array.
        shape: array shape; axis 0 is the row axis (clips ``T`` or tokens ``L``).
        chunk_rows: rows per chunk along axis 0.
        attrs: the array's attributes.
        fast: whether the raw-byte path is used.
        dtype: element type: float16, or int8 for packed quantized tokens. Buffers passed to the
            reads are of this dtype.
    """

    path: Path
    shape: tuple[int, ...]
    chunk_rows: int
    attrs: dict[str, Any]
    fast: bool
    dtype: np.dtype = DTYPE
    _separator: str = "."
    _prefix: str = "c"
    _verified: set[int] = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def load(cls, path: Path) -> RawArray:
        """Read and validate ``path/zarr.json``; :class:`StoreError` if it is not a zarr v3 array of one
        of :data:`DATA_TYPES`."""
        meta_file = path / "zarr.json"
        try:
            meta = json.loads(meta_file.read_bytes())
        except FileNotFoundError:
            raise StoreError(f"{path} is not a zarr array (no zarr.json)") from None
        except (OSError, ValueError) as err:
            raise StoreError(f"{meta_file} is unreadable: {err}") from None
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
            raise StoreError(f"{meta_file} does not describe a zarr v3 array")
        if meta.get("data_type") not in DATA_TYPES:
            raise StoreError(
                f"{path}: dtype {meta.get('data_type')!r}, the store holds {' or '.join(DATA_TYPES)} tokens"
            )
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
            and meta.get("codecs") in _FAST_CODECS
            and not meta.get("storage_transformers")
            and encoding.get("name") in ("default", "v2")
        )
        return cls(
            path=path,
            shape=shape,
            chunk_rows=int(chunks[0]) if chunks else max(shape[0], 1),
            attrs=meta.get("attributes", {}),
            fast=fast,
            dtype=DATA_TYPES[meta["data_type"]],
            _separator=separator,
            _prefix="c" if encoding.get("name") == "default" else "",
        )

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row (one clip / one token)."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

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

    def read_rows(self, start: int, stop: int, out: np.ndarray, check: str | None = None) -> np.ndarray:
        """Read rows ``[start, stop)`` into ``out`` (C-contiguous, of that shape and :attr:`dtype`) and
        return it.

        Fast arrays: one ``preadv`` per chunk touched, straight into ``out`` (no other buffer).
        ``check``: what is read, in words (``video 'v1'``); when given, every chunk touched is
        checked against its stored CRC-32 (:meth:`check_rows`).
        """
        self._read_rows(start, stop, out)
        if check is not None:
            self.check_rows(start, stop, out, check)
        return out

    def _read_rows(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        if not self.fast:
            out[...] = zarr.open_array(self.path, mode="r")[start:stop]
            return out
        view = out.data.cast("B")
        row = self.row_nbytes
        pos = start
        while pos < stop:
            index = pos // self.chunk_rows
            end = min(stop, (index + 1) * self.chunk_rows)
            begin, want = (pos - start) * row, (end - pos) * row
            chunk = self.chunk_path(index)
            fd = _open_chunk(chunk)
            try:
                got = _pread_into(fd, view[begin : begin + want], (pos - index * self.chunk_rows) * row)
            finally:
                os.close(fd)
            if got != want:
                raise _truncated(chunk)
            pos = end
        return out

    def read_slab(self, first: int, out: np.ndarray, check: str | None = None) -> np.ndarray:
        """Read entries ``[first, first + n)`` of axis 1 of every row into ``out`` (C-contiguous, of
        :attr:`dtype` and shape ``(rows, n, *shape[2:])``) and return it: a few layers of a video.

        The slab of a row is contiguous on disk but the slabs of two rows are not. Fast arrays read
        unchecked: one ``preadv`` per row of just the slab's bytes, straight into ``out``. With ``check``
        every byte is read anyway (the CRC-32 covers whole chunks): the array is mapped (or read) once,
        checked, and the slab copied from it into ``out``.
        """
        count = out.shape[1]
        if not 0 <= first <= first + count <= self.shape[1] or out.shape[0] != self.shape[0]:
            raise ValueError(f"slab [{first}, {first + count}) of axis 1 does not fit shape {self.shape}")
        if check is not None or not self.fast:
            whole = self.map(check) if check is not None else None
            if whole is None:
                whole = self.read_rows(0, self.shape[0], np.empty(self.shape, self.dtype), check)
            np.copyto(out, whole[:, first : first + count])
            return out
        inner = int(np.prod(self.shape[2:], dtype=np.int64)) * self.dtype.itemsize
        span, view, row = count * inner, out.data.cast("B"), self.row_nbytes
        for index in range(self.num_chunks):
            chunk = self.chunk_path(index)
            fd = _open_chunk(chunk)
            try:
                for r in range(index * self.chunk_rows, min(self.shape[0], (index + 1) * self.chunk_rows)):
                    offset = (r - index * self.chunk_rows) * row + first * inner
                    if _pread_into(fd, view[r * span : (r + 1) * span], offset) != span:
                        raise _truncated(chunk)
            finally:
                os.close(fd)
        return out

    def check_rows(self, start: int, stop: int, rows: np.ndarray, what: str) -> None:
        """Check the chunks touched by rows ``[start, stop)`` (read into ``rows``) against their CRC-32.

        A chunk read whole is checked from ``rows`` (one CRC pass over the bytes just read); a chunk
        read in part (a query inside a part) is read whole and checked the first time only, which this
        object remembers. :class:`StoreError` naming the store, ``what`` and ``r2 shards verify`` on a
        mismatch or when the array records no checksums.
        """
        store = self.path.parent.parent
        stored = self.attrs.get("crc32")
        if not isinstance(stored, list) or len(stored) != self.num_chunks:
            raise StoreError(
                f"store {store}: {what} has no CRC-32 per chunk in {self.path / 'zarr.json'}, so its tokens "
                f"cannot be checked; run `r2 shards verify {store}` and rewrite what it reports"
            )
        for index in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
            lo = index * self.chunk_rows
            hi = min(self.shape[0], lo + self.chunk_rows)
            if start <= lo and hi <= stop:
                data = rows[lo - start : hi - start]
            elif index in self._verified:
                continue
            else:
                data = self._read_rows(lo, hi, np.empty((hi - lo, *self.shape[1:]), self.dtype))
            actual = crc32_hex(data.data.cast("B"))
            if actual != stored[index]:
                where = self.chunk_path(index) if self.fast else f"chunk {index} of {self.path}"
                raise StoreError(
                    f"store {store}: the tokens of {what} are corrupt ({where} has CRC-32 {actual}, the "
                    f"store recorded {stored[index]}); run `r2 shards verify {store}` and rewrite what it "
                    "reports (re-extract or re-import)"
                )
            self._verified.add(index)

    def map(self, check: str | None = None) -> np.ndarray | None:
        """The whole array as a read-only view of its mapped chunk file (single-chunk fast arrays only,
        else ``None``). The pages are read in by this call (``MAP_POPULATE`` where available);
        ``check`` as for :meth:`read_rows` (one CRC pass over the mapping)."""
        if not self.fast or self.num_chunks != 1:
            return None
        chunk = self.chunk_path(0)
        fd = _open_chunk(chunk)
        try:
            if os.fstat(fd).st_size < self.nbytes:
                raise _truncated(chunk)
            mapping = mmap.mmap(fd, self.nbytes, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        array = np.frombuffer(mapping, self.dtype).reshape(self.shape)
        if check is not None:
            self.check_rows(0, self.shape[0], array, check)
        return array

    def scan(self) -> ChunkScan:
        """CRC-32 of every chunk and the rows holding a non-finite value (of packed int8 tokens: a
        non-finite scale) (reads everything once)."""
        sums = []
        bad = []
        for index in range(self.num_chunks):
            start = index * self.chunk_rows
            stop = min(self.shape[0], start + self.chunk_rows)
            buf = self._read_rows(start, stop, np.empty((stop - start, *self.shape[1:]), self.dtype))
            sums.append(crc32_hex(buf.data.cast("B")))
            values = buf if self.dtype == DTYPE else unpack(buf)[1]
            finite = np.isfinite(values.reshape(stop - start, -1)).all(axis=1)
            bad.append(start + np.flatnonzero(~finite))
        return ChunkScan(sums, np.concatenate(bad) if bad else np.empty(0, np.int64))


@dataclass(frozen=True)
class ChunkScan:
    """What :meth:`RawArray.scan` read.

    Attributes:
        crc32: CRC-32 of the little-endian bytes of the in-bounds rows of each chunk, 8 hex digits.
        nonfinite_rows: indices (axis 0) of the rows holding a NaN or ±Inf, ascending.
    """

    crc32: list[str]
    nonfinite_rows: np.ndarray


def write_raw_array(
    path: Path,
    rows: Sequence[np.ndarray],
    tail: tuple[int, ...],
    chunk_rows: int,
    attrs: dict[str, Any],
    fsync: bool,
) -> None:
    """Write the row blocks ``rows`` (each ``(n_i, *tail)`` C-contiguous, all of one dtype of
    :data:`DATA_TYPES`) as one array at ``path``.

    The blocks are concatenated along axis 0 and cut into chunks of ``chunk_rows`` rows, written
    as raw little-endian bytes (what zarr's ``bytes`` codec produces), the last one zero-padded;
    ``attrs`` gets ``crc32`` = the per-chunk checksums of the in-bounds bytes. ``zarr.json`` is
    written last; with ``fsync`` every file is flushed to disk.
    """
    total = sum(r.shape[0] for r in rows)
    dtype = rows[0].dtype
    names = {d: name for name, d in DATA_TYPES.items()}
    if dtype not in names or any(r.dtype != dtype for r in rows):
        found = sorted({str(r.dtype) for r in rows})
        raise ValueError(f"rows must all be one of {list(DATA_TYPES)}, got {found}")
    path.mkdir(parents=True, exist_ok=True)
    layout = RawArray(path, (total, *tail), chunk_rows, {}, True, dtype)
    chunk_nbytes = chunk_rows * layout.row_nbytes
    sums: list[str] = []
    pending = [r.data.cast("B") for r in rows]
    for index in range(layout.num_chunks):
        in_bounds = min(chunk_rows, total - index * chunk_rows) * layout.row_nbytes
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
            if in_bounds < chunk_nbytes:
                f.write(bytes(chunk_nbytes - in_bounds))
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        sums.append(_hex(crc))
    zarr.create_array(
        store=str(path),
        shape=(total, *tail),
        chunks=(chunk_rows, *tail),
        dtype=names[dtype],
        compressors=None,
        filters=None,
        serializer=BytesCodec(endian="little"),
        fill_value=0,
        chunk_key_encoding=_CHUNK_KEY_ENCODING,
        attributes={**attrs, "crc32": sums},
        config={"write_empty_chunks": True},
    )
    if fsync:
        fsync_path(path / "zarr.json")
