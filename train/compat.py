"""Which stores a config or a checkpoint may be used with.

A checkpoint records the identity of the store it was trained on (:meth:`Manifest.identity`:
backbone, weights checksum, fps, layers, frame size, token shapes, dataset, token dtype and pooling,
global token, preprocessing); a store that differs in any of them is refused with a
:class:`~shards.errors.StoreError` that names both values. A config is checked against a store's
geometry before any training starts, and takes its token dims (P, C, Cq) from the store's manifest
(P of a store extracted with ``--token-pool N`` is that of the pooled grid).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

from shards.backbones import TokenDims, normalize_backbone
from shards.datasets import get_dataset
from shards.errors import ConfigError, StoreError
from shards.manifest import DEFAULTS, IDENTITY_FIELDS, check_expected, pooled_tokens
from shards.store import FeatureStore, Manifest, open_store
from train.config import RunConfig


def open_store_for(identity: dict[str, Any], path: str | Path, source: str) -> FeatureStore:
    """Open the store at ``path`` requiring the recorded ``identity``.

    ``identity`` is what a checkpoint records: :meth:`shards.manifest.Manifest.identity` of its
    training store. Checkpoints of earlier versions recorded fewer :data:`~shards.manifest.IDENTITY_FIELDS`:
    a field they lack is compared as its :data:`~shards.manifest.DEFAULTS` value (a float16 store,
    ``token_pool`` 1, class token, the reference's preprocessing), others they lack are not compared.

    Raises:
        StoreError: the store differs; the message names each field with both values and ``source``.
    """
    wanted = {k: identity.get(k, DEFAULTS.get(k)) for k in IDENTITY_FIELDS if k in identity or k in DEFAULTS}
    store = open_store(path)
    try:
        hint = "use the store it was trained on, or train on this one"
        check_expected(store.path, store.manifest.to_attrs(), wanted, hint)
    except StoreError as err:
        raise StoreError(f"{source} was trained on another store: {err}") from None
    return store


def check_config_store(cfg: RunConfig, manifest: Manifest, path: str | Path) -> None:
    """Check that a model of ``cfg`` can be trained on the store at ``path`` with ``manifest``.

    Token dims (P, C, Cq) that ``cfg`` sets, or takes from the backbone registry (P pooled as the
    store's ``token_pool`` says), must equal the store's; unknown ones are left to :func:`config_for_store`.

    Raises:
        StoreError: other dataset, backbone, token dims, or fewer stored layers than the model fuses.
    """
    problems = []
    if get_dataset(manifest.dataset).name != cfg.dataset:
        problems.append(f"dataset is {manifest.dataset!r} but preset {cfg.preset!r} is for {cfg.dataset!r}")
    if normalize_backbone(manifest.backbone) != normalize_backbone(cfg.model.arch):
        problems.append(f"backbone is {manifest.backbone!r} but model.arch is {cfg.model.arch!r}")
    stored = (manifest.video_tokens, manifest.video_width, manifest.text_width)
    wanted = _pooled(cfg.model.known_token_dims(), cfg.model.video_tokens is None, manifest.token_pool)
    if any(w is not None and w != s for w, s in zip(wanted, stored, strict=True)):
        shown = ", ".join("?" if w is None else str(w) for w in wanted)
        problems.append(
            f"token dims (P, C, Cq) are {stored} but the config gives ({shown}) "
            "(model.video_tokens, model.video_width, model.text_width, or the backbone's defaults)"
        )
    if manifest.layers < cfg.model.layers:
        problems.append(f"it holds {manifest.layers} layers but model.layers is {cfg.model.layers}")
    if problems:
        raise StoreError(
            f"store {path} does not fit preset {cfg.preset!r}: " + "; ".join(problems)
            + " (use a store extracted for this preset, or --set model.arch/model.layers)"
        )


def _pooled(dims: tuple[int | None, ...], from_registry: bool, pool: int) -> tuple[int | None, ...]:
    """``dims`` (P, C, Cq) with a P taken from the backbone registry (``from_registry``) pooled by
    ``pool`` (:func:`shards.manifest.pooled_tokens`); kept as it is when ``pool`` does not divide its
    grid (then it cannot be the store's P)."""
    p = dims[0]
    if not from_registry or p is None or pool == 1:
        return dims
    try:
        return (pooled_tokens(p, pool), *dims[1:])
    except ConfigError:
        return dims


def with_token_dims(cfg: RunConfig, dims: TokenDims) -> RunConfig:
    """A copy of ``cfg`` whose unset token dims (``model.video_tokens`` ...) are taken from ``dims``."""
    m = cfg.model
    model = replace(
        m,
        video_tokens=dims.video_tokens if m.video_tokens is None else m.video_tokens,
        video_width=dims.video_width if m.video_width is None else m.video_width,
        text_width=dims.text_width if m.text_width is None else m.text_width,
    )
    return replace(copy.deepcopy(cfg), model=model)


def config_for_store(cfg: RunConfig, manifest: Manifest, path: str | Path) -> RunConfig:
    """``cfg`` checked against the store (:func:`check_config_store`) with its token dims set from the
    manifest, so that the saved config and checkpoints record them.

    Raises:
        StoreError: the store does not fit ``cfg`` (e.g. ``model.video_tokens`` set to another P).
    """
    check_config_store(cfg, manifest, path)
    return with_token_dims(cfg, TokenDims(manifest.video_tokens, manifest.video_width, manifest.text_width))
