"""The store's refusal of non-finite tokens: NaN, ±Inf, and values that would overflow float16.

A NaN or Inf token makes every loss it touches non-finite, so a run on it skips every step and
ends with its initial weights. :func:`check_finite` is called by every write of tokens
(:meth:`shards.store.FeatureStore.write_video` / ``write_queries``, hence ``r2 extract`` and both
importers) before anything is written.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shards.errors import StoreError

FLOAT16_MAX = float(np.finfo(np.float16).max)
"""Largest finite float16 (65504); wider floats that round beyond it would be stored as ±Inf."""


def _count(mask: np.ndarray, what: str) -> str:
    """``N value(s) <what>, the first at index (...)`` for the true elements of ``mask``."""
    first = tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))
    return f"{int(mask.sum())} value(s) {what}, the first at index {first}"


def check_finite(array: Any, what: str) -> None:
    """Raise :class:`StoreError` when the float array ``array`` holds a NaN or ±Inf, or (for float32 /
    float64) a value that float16 cannot hold; ``what`` names it in the message (``tokens of video
    'v1'``, a file name). Arrays of other dtypes are left to the caller's dtype check.
    """
    arr = np.asarray(array)
    if not np.issubdtype(arr.dtype, np.floating) or arr.size == 0:
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        raise StoreError(
            f"{what}: {_count(bad, 'not finite (NaN or Inf)')}; the store refuses non-finite tokens "
            "(training on them skips every step): fix or re-extract the features"
        )
    if arr.dtype.itemsize > np.dtype(np.float16).itemsize:
        with np.errstate(over="ignore"):
            over = np.isinf(arr.astype(np.float16))
        if over.any():
            raise StoreError(
                f"{what}: {_count(over, f'beyond float16 range ±{FLOAT16_MAX:g}')} (up to "
                f"{float(np.abs(arr).max()):g}), which the store would hold as Inf: rescale the features"
            )
