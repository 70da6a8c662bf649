"""Which stores a config or a checkpoint may be used with.

A checkpoint records the identity of the store it was trained on (backbone, weights checksum, fps,
layers, token shapes, dataset); a store that differs in any of them is refused with a
:class:`~shards.errors.StoreError` that names both values. A config is checked against a store's
geometry before any training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shards.datasets import get_dataset
from shards.errors import ConfigError, StoreError
from shards.store import FeatureStore, Manifest, open_store
from train.config import RunConfig, normalize_arch

IDENTITY_FIELDS = (
    "backbone",
    "pretrained",
    "weights_sha256",
    "fps",
    "layers",
    "video_tokens",
    "video_width",
    "text_width",
    "dataset",
)
"""Manifest fields a checkpoint records and requires of the store it is used with."""


def store_identity(manifest: Manifest) -> dict[str, Any]:
    """The :data:`IDENTITY_FIELDS` of ``manifest``."""
    attrs = manifest.to_attrs()
    return {k: attrs[k] for k in IDENTITY_FIELDS}


def open_store_for(identity: dict[str, Any], path: str | Path, source: str) -> FeatureStore:
    """Open the store at ``path`` requiring the recorded ``identity``.

    Raises:
        StoreError: the store differs; the message names each field with both values and ``source``.
    """
    try:
        return open_store(path, expect={k: v for k, v in identity.items() if k in IDENTITY_FIELDS})
    except StoreError as err:
        raise StoreError(f"{source} was trained on another store: {err}") from None


def check_config_store(cfg: RunConfig, manifest: Manifest, path: str | Path) -> None:
    """Check that a model of ``cfg`` can be trained on the store at ``path`` with ``manifest``.

    Raises:
        StoreError: other dataset, backbone, token shapes, or fewer stored layers than the model fuses.
    """
    problems = []
    if get_dataset(manifest.dataset).name != cfg.dataset:
        problems.append(f"dataset is {manifest.dataset!r} but preset {cfg.preset!r} is for {cfg.dataset!r}")
    try:
        arch = normalize_arch(manifest.backbone)
    except ConfigError:
        arch = manifest.backbone
    if arch != cfg.model.arch:
        problems.append(f"backbone is {manifest.backbone!r} but model.arch is {cfg.model.arch!r}")
    else:
        stored = (manifest.video_tokens, manifest.video_width, manifest.text_width)
        wanted = (cfg.model.video_tokens, cfg.model.video_width, cfg.model.text_width)
        if stored != wanted:
            problems.append(f"token shapes (P, C, Cq) are {stored} but the model expects {wanted}")
    if manifest.layers < cfg.model.layers:
        problems.append(f"it holds {manifest.layers} layers but model.layers is {cfg.model.layers}")
    if problems:
        raise StoreError(
            f"store {path} does not fit preset {cfg.preset!r}: " + "; ".join(problems)
            + " (use a store extracted for this preset, or --set model.arch/model.layers)"
        )
