"""Per-token int8 quantization of a store's tokens (manifest ``dtype: int8``).

Each token (the last axis: C channels) becomes C int8 values ``q`` and one float16 ``scale`` with
``x ≈ q * scale``: symmetric, no zero point, ``scale = max|x| / 127`` rounded *up* to a float16 (so
``|x / scale| <= 127``: nothing is clipped) and ``q = round(x / scale)``. Per value the error is at
most ``scale / 2`` (about ``max|x| / 254`` of its token) plus the float16 rounding of the result.
Quantization starts from the float16 value of the tokens (what a float16 store holds), so
``roundtrip(tokens, "int8")`` is exactly what an int8 store gives back for ``tokens``.

On disk, and in a token cache, a quantized token is *packed*: int8 ``(..., C + 2)``, its C values
then the two little-endian bytes of its float16 scale (:func:`pack`, :func:`unpack`). One array per
video holds both, so one chunk file, one CRC-32 and one mapping cover values and scales, and the
last layers of a video are one contiguous slab as in a float16 store.

Dequantization computes ``q * scale`` in float32 (exact: 8 bits times 11) and rounds it once to
float16, so whatever computes it (numpy here, torch on the CPU or a GPU in ``train.data.loader``)
gives the same bits.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from shards.errors import ConfigError

DTYPES = ("float16", "int8")
"""Token dtypes a store may hold (the manifest's ``dtype``)."""
QMAX = 127
"""Largest ``|q|``: the int8 range is used symmetrically (-127..127)."""
SCALE_BYTES = 2
"""Bytes of a token's float16 scale at the end of its packed row."""

HALF = np.dtype("<f2")
_PACKED = np.dtype("i1")
_MAX_SCALE = np.float16(515.5)
"""Largest scale: ``127 x 515.5`` is still a finite float16 (its largest is 65504)."""
_CHUNK = 1 << 20
"""Values dequantized per step (bounds the float32 temporary)."""


def check_dtype(dtype: str) -> str:
    """``dtype`` if it is one of :data:`DTYPES`, else :class:`ConfigError` naming them."""
    if dtype not in DTYPES:
        raise ConfigError(f"token dtype must be {' or '.join(DTYPES)}, got {dtype!r}")
    return dtype


def stored_width(width: int, dtype: str) -> int:
    """Last-axis length on disk of tokens of ``width`` channels stored as ``dtype`` (int8: + the scale)."""
    return width + SCALE_BYTES if check_dtype(dtype) == "int8" else width


def stored_dtype(dtype: str) -> np.dtype:
    """numpy dtype of a store's token arrays: float16, or int8 (packed) for ``dtype`` ``int8``."""
    return _PACKED if check_dtype(dtype) == "int8" else HALF


def _scale(peak: np.ndarray) -> np.ndarray:
    """float16 scales ``>= peak / 127`` (float32 ``peak``): rounded up, at most :data:`_MAX_SCALE`."""
    wanted = peak / np.float32(QMAX)
    scale = wanted.astype(HALF)
    low = scale.astype(np.float32) < wanted
    scale[low] = np.nextafter(scale[low], HALF.type(np.inf))
    return np.minimum(scale, _MAX_SCALE)


def quantize(tokens: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(q, scale)`` of float tokens ``(..., C)``: ``q`` int8 ``(..., C)``, ``scale`` float16 ``(..., 1)``.

    The tokens are taken as float16 first (module docstring); a token of zeros gets scale 0.
    They must be finite (the store checks that before writing).
    """
    x = np.asarray(tokens, dtype=HALF).astype(np.float32)
    scale = _scale(np.maximum(x.max(axis=-1, keepdims=True), -x.min(axis=-1, keepdims=True)))
    divisor = scale.astype(np.float32)
    np.divide(x, divisor, out=x, where=divisor > 0)  # a zero scale: a token of zeros, left as is
    np.rint(x, out=x)
    np.clip(x, -QMAX, QMAX, out=x)
    return x.astype(_PACKED), scale


def dequantize(q: np.ndarray, scale: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float16 tokens ``q * scale`` (``q`` int8 ``(..., C)``, ``scale`` float16 ``(..., 1)``), written
    into ``out`` (float16, that shape) when given. Computed in float32, rounded once (module docstring)."""
    if out is None:
        out = np.empty(q.shape, HALF)
    if out.ndim < 2:
        return _product(q, scale, out)
    rows = max(1, _CHUNK // max(1, math.prod(out.shape[1:])))
    for start in range(0, out.shape[0], rows):
        part = slice(start, start + rows)
        _product(q[part], scale[part], out[part])
    return out


def _product(q: np.ndarray, scale: np.ndarray, out: np.ndarray) -> np.ndarray:
    product = q.astype(np.float32)
    product *= scale.astype(np.float32)
    np.copyto(out, product, casting="same_kind")
    return out


def pack(tokens: Any) -> np.ndarray:
    """Packed int8 ``(..., C + 2)`` of float tokens ``(..., C)``: :func:`quantize`'s values, then the
    bytes of the scale."""
    q, scale = quantize(tokens)
    packed = np.empty((*q.shape[:-1], q.shape[-1] + SCALE_BYTES), _PACKED)
    packed[..., : q.shape[-1]] = q
    packed[..., q.shape[-1] :] = scale.view(_PACKED)
    return packed


def unpack(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Views ``(q (..., C), scale (..., 1) float16)`` of packed tokens ``(..., C + 2)`` (no copy; the
    last axis must be contiguous, as in any slice of a stored array along its other axes)."""
    width = packed.shape[-1] - SCALE_BYTES
    return packed[..., :width], packed[..., width:].view(HALF)


def dequantize_packed(packed: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float16 tokens ``(..., C)`` of packed tokens ``(..., C + 2)``, into ``out`` when given."""
    return dequantize(*unpack(packed), out=out)


def roundtrip(tokens: Any, dtype: str) -> np.ndarray:
    """float16 tokens ``(..., C)`` as a store of ``dtype`` gives back float tokens ``tokens`` (an array,
    or anything ``np.asarray`` takes, e.g. a CPU tensor): their float16 value for ``float16``,
    quantized and dequantized for ``int8``."""
    if check_dtype(dtype) == "float16":
        return np.asarray(tokens, dtype=HALF)
    return dequantize(*quantize(tokens))
