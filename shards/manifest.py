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
from shards.errors import StoreError

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
)
"""Manifest fields that decide whether two stores hold the same tokens (not the creation time or
the package version). A checkpoint records them (:meth:`Manifest.identity`) and requires them of the
store it is resumed on (``train.compat.open_store_for``)."""

DEFAULTS: dict[str, Any] = {"precision": "fp32", "global_token": "cls", "preprocess": REFERENCE_PREPROCESS}
"""Values of manifest fields that stores of earlier versions lack: they open as if they had them.
(Stores extracted on CUDA before ``precision`` existed ran the towers under fp16 autocast; those
made on CPU ran them in fp32. Stores made before ``global_token`` and ``preprocess`` existed hold
OpenAI CLIP tokens: the class token first, frames made the reference's way.)"""


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
        dtype: token dtype, ``float16``.
        video_tokens: P, tokens per frame (CLS first).
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


def field_names() -> list[str]:
    """Names of the :class:`Manifest` fields, in order."""
    return [f.name for f in dataclasses.fields(Manifest)]


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
    precision: str = DEFAULTS["precision"],
    global_token: str = DEFAULTS["global_token"],
    preprocess: dict[str, Any] | None = None,
) -> Manifest:
    """A :class:`Manifest` with format version, dtype, package version and creation time filled in.

    ``fps`` is in clips per second (``None`` = per video); ``layers``, ``video_tokens``,
    ``video_width`` and ``text_width`` are k, P, C and Cq; ``precision`` is what the towers
    computed in (``fp32`` / ``fp16``); ``global_token`` is ``cls`` or ``mean``; ``preprocess`` the
    frames' preprocessing (``None``: the reference's, OpenAI CLIP's).

    Raises:
        ValueError: ``global_token`` is not one of :data:`~shards.backbones.GLOBAL_TOKENS` (a
            programming error).
    """
    if global_token not in GLOBAL_TOKENS:
        raise ValueError(f"global_token must be one of {GLOBAL_TOKENS}, got {global_token!r}")
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
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        precision=precision,
        global_token=global_token,
        preprocess=copy.deepcopy(DEFAULTS["preprocess"] if preprocess is None else preprocess),
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def check_expected(where: str | Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Raise :class:`StoreError` naming every field of ``wanted`` whose stored value differs.

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
            + " (use another --out path or matching settings)"
        )
