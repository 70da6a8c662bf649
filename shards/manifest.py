"""The manifest of a feature store: provenance and token geometry, stored as the root attributes.

Also the identity check used when a store is opened with expectations or created over an
existing one: which fields must agree, and the one-line message naming both values when they do not.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shards.backbones import GLOBAL_TOKENS, REFERENCE_PREPROCESS
from shards.errors import ConfigError, StoreError
from shards.quant import check_dtype, stored_width

FORMAT_VERSION = 1
"""Version of the on-disk layout; a store of another version is refused on open."""

IDENTITY_FIELDS = (
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
    "precision",
    "global_token",
    "preprocess",
    "token_pool",
)
"""Manifest fields that decide whether two stores hold the same tokens (not the creation time or
the package version). A checkpoint records them (:meth:`Manifest.identity`) and requires them of the
store it is resumed on (``train.compat.open_store_for``)."""

DEFAULTS: dict[str, Any] = {
    "precision": "fp32",
    "global_token": "cls",
    "preprocess": REFERENCE_PREPROCESS,
    "token_pool": 1,
}
"""Values of manifest fields that stores of earlier versions lack: they open as if they had them.
(Stores extracted on CUDA before ``precision`` existed ran the towers under fp16 autocast; those
made on CPU ran them in fp32. Stores made before ``global_token`` and ``preprocess`` existed hold
OpenAI CLIP tokens: the class token first, frames made the reference's way. Stores made before
``token_pool`` existed hold the whole patch grid.) Checkpoints that recorded fewer identity fields
are compared with these values too (``train.compat.open_store_for``)."""


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
        fps: clips sampled per second, ``None`` = per-video rate (see ``FeatureStore.video_fps``).
        dtype: how tokens are stored: ``float16``, or ``int8`` with a float16 scale per token
            (:mod:`shards.quant`); reads give float16 either way.
        video_tokens: P, tokens per frame (the global token first), after ``token_pool``.
        video_width: C, width of the image tower.
        text_width: Cq, width of the text tower.
        dataset: dataset registry name.
        package_version: version of the package that created the store.
        created: creation time, ISO 8601.
        precision: what the CLIP towers computed in: ``fp32`` (the reference) or ``fp16``
            (autocast); the tokens are stored as ``dtype`` either way.
        global_token: token 0 of a frame: ``cls`` (the tower's class token) or ``mean`` (the mean of
            the layer's patch tokens, for towers without a class token such as SigLIP's).
        preprocess: how frames were made for the image tower (``resize_mode``, ``interpolation``,
            ``mean``, ``std``, ``fill_color``; :meth:`shards.backbones.Preprocess.record`), at
            ``frame_size``.
        token_pool: N, the side of the blocks of the patch grid averaged into one token at
            extraction (1: the whole grid; :func:`pooled_tokens`). Token 0 is kept as it is.
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
    precision: str = DEFAULTS["precision"]
    global_token: str = DEFAULTS["global_token"]
    preprocess: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULTS["preprocess"]))
    token_pool: int = DEFAULTS["token_pool"]

    def to_attrs(self) -> dict[str, Any]:
        """The manifest as a JSON-able dict (the root attributes)."""
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The :data:`IDENTITY_FIELDS` of this manifest."""
        return {k: v for k, v in self.to_attrs().items() if k in IDENTITY_FIELDS}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str | Path) -> Manifest:
        """Parse root attributes; :class:`StoreError` naming ``where`` if fields are missing."""
        names = field_names()
        missing = [n for n in names if n not in attrs and n not in DEFAULTS]
        if missing:
            raise StoreError(f"store {where}: manifest lacks {', '.join(missing)}; the store is damaged")
        values: dict[str, Any] = {n: attrs[n] if n in attrs else copy.deepcopy(DEFAULTS[n]) for n in names}
        return cls(**values)

    @property
    def video_shape(self) -> tuple[int, int, int]:
        """``(k, P, C)``: shape of one clip's video tokens."""
        return (self.layers, self.video_tokens, self.video_width)

    @property
    def query_shape(self) -> tuple[int, int]:
        """``(k, Cq)``: shape of one query token."""
        return (self.layers, self.text_width)

    @property
    def stored_video_shape(self) -> tuple[int, int, int]:
        """``(k, P, C')``: shape of one clip on disk; ``C' = C + 2`` for ``int8`` (:mod:`shards.quant`)."""
        return (self.layers, self.video_tokens, stored_width(self.video_width, self.dtype))

    @property
    def stored_query_shape(self) -> tuple[int, int]:
        """``(k, Cq')``: shape of one query token on disk; ``Cq' = Cq + 2`` for ``int8``."""
        return (self.layers, stored_width(self.text_width, self.dtype))


def field_names() -> list[str]:
    """Names of the :class:`Manifest` fields, in order."""
    return [f.name for f in dataclasses.fields(Manifest)]


def package_version() -> str:
    """Installed version of this toolkit (``0+unknown`` when not installed)."""
    try:
        return importlib.metadata.version("r2tuning-toolkit")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def check_pool(pool: int) -> int:
    """``pool`` if it is a positive integer (a ``token_pool``), else :class:`ConfigError`."""
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        raise ConfigError(f"--token-pool must be a positive integer, got {pool!r}")
    return pool


def pooled_tokens(video_tokens: int, pool: int, backbone: str = "the backbone") -> int:
    """P of frames of ``video_tokens`` tokens (token 0, then a g x g patch grid: ``P = g² + 1``) whose
    grid is average-pooled in ``pool`` x ``pool`` blocks: ``(g / pool)² + 1``.

    Raises:
        ConfigError: ``pool`` is not a positive integer, the grid is not square, or ``pool`` does not
            divide its side (the message names the grid, ``backbone`` and the divisors).
    """
    check_pool(pool)
    side = math.isqrt(video_tokens - 1)
    if side * side != video_tokens - 1:
        if pool == 1:
            return video_tokens
        raise ConfigError(
            f"--token-pool {pool}: the {video_tokens - 1} patch tokens of {backbone} are not a square grid"
        )
    if side % pool:
        divisors = ", ".join(str(d) for d in range(1, side + 1) if side % d == 0)
        raise ConfigError(
            f"--token-pool {pool} does not divide the {side}x{side} patch grid of {backbone}: "
            f"use one of {divisors}"
        )
    return (side // pool) ** 2 + 1


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
    precision: str = DEFAULTS["precision"],
    global_token: str = DEFAULTS["global_token"],
    preprocess: dict[str, Any] | None = None,
    dtype: str = "float16",
    token_pool: int = DEFAULTS["token_pool"],
) -> Manifest:
    """A :class:`Manifest` with format version, dtype, package version and creation time filled in.

    ``fps`` is in clips per second (``None`` = per video); ``layers``, ``video_tokens``,
    ``video_width`` and ``text_width`` are k, P, C and Cq; ``precision`` is what the towers
    computed in (``fp32`` / ``fp16``); ``global_token`` is ``cls`` or ``mean``; ``preprocess`` the
    frames' preprocessing (``None``: the reference's, OpenAI CLIP's); ``dtype`` how tokens are stored
    (``float16`` / ``int8``, :mod:`shards.quant`); ``token_pool`` the pooling of the patch grid that
    ``video_tokens`` already reflects (:func:`pooled_tokens`).

    Raises:
        ValueError: ``global_token`` is not one of :data:`~shards.backbones.GLOBAL_TOKENS` (a
            programming error).
        ConfigError: ``dtype`` is not ``float16`` or ``int8``, ``token_pool`` is not a positive integer.
    """
    if global_token not in GLOBAL_TOKENS:
        raise ValueError(f"global_token must be one of {GLOBAL_TOKENS}, got {global_token!r}")
    check_pool(token_pool)
    return Manifest(
        format_version=FORMAT_VERSION,
        backbone=backbone,
        pretrained=pretrained,
        weights_sha256=weights_sha256,
        layers=int(layers),
        frame_size=int(frame_size),
        fps=None if fps is None else float(fps),
        dtype=check_dtype(dtype),
        video_tokens=int(video_tokens),
        video_width=int(video_width),
        text_width=int(text_width),
        dataset=dataset,
        package_version=package_version(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        precision=precision,
        global_token=global_token,
        preprocess=copy.deepcopy(DEFAULTS["preprocess"] if preprocess is None else preprocess),
        token_pool=token_pool,
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def check_expected(
    where: str | Path,
    stored: dict[str, Any],
    wanted: dict[str, Any],
    hint: str = "use another --out path or matching settings",
) -> None:
    """Raise :class:`StoreError` naming every field of ``wanted`` whose stored value differs, then ``hint``.

    Numbers compare with a relative tolerance of 1e-9 (an fps of ``0.5`` equals ``0.5000000001``);
    a field the store lacks compares as its :data:`DEFAULTS` value (stores of earlier versions).
    :class:`ValueError` for keys that are not manifest fields (a programming error).
    """
    unknown = set(wanted) - set(field_names())
    if unknown:
        raise ValueError(f"expect has unknown manifest fields: {sorted(unknown)}")
    have = {key: stored.get(key, DEFAULTS.get(key)) for key in wanted}
    diffs = [
        f"{key} is {have[key]!r} in the store but {value!r} was expected"
        for key, value in wanted.items()
        if not _same(have[key], value)
    ]
    if diffs:
        raise StoreError(
            f"store {where} does not match: "
            + "; ".join(diffs)
            + f" ({hint})"
        )
