"""The training loop: a feature store in, a scored checkpoint out.

:func:`train_run` streams the store's ``train.train_split`` with
:class:`train.data.loader.StreamingLoader` (queries of one video share one read of its tokens), takes
optimizer steps with :mod:`train.engine.step`, validates every ``train.val_every`` epochs with
:mod:`train.engine.evaluate`, keeps the best checkpoint on the preset's key metric and writes the run
directory described in :mod:`train.engine.runlog` (through :mod:`train.engine.records`, as the
sweep's shared pass does). CLIP is never loaded. An interrupted run continues with ``resume=True``
from its last completed epoch, bit-for-bit on CPU: weights, optimizer, scaler, counters and the
python/numpy/torch generator states are restored, and the loader order and positive-clip draws are
pure functions of (seed, epoch).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from shards.datasets import DatasetSpec, get_dataset
from shards.errors import CheckpointError, ConfigError
from shards.schema import Query
from shards.store import FeatureStore, Manifest, open_store
from train.checkpoint import Checkpoint, load_weights, read_checkpoint
from train.compat import config_for_store, open_store_for, store_identity, with_token_dims
from train.config import RunConfig
from train.data.batching import ModelInputs, model_inputs
from train.data.loader import LoaderConfig, StreamingLoader
from train.data.targets import query_targets
from train.engine.evaluate import validate, validation_loader
from train.engine.records import Best, EpochStats, end_epoch, record_validation, validation_due
from train.engine.rng import capture_rng, restore_rng, seed_everything
from train.engine.runlog import RunPaths, prepare_run_dir, read_metrics, truncate_metrics, write_json_atomic
from train.engine.step import TrainState, build_state, load_state_meta, resolve_device, train_step

MIN_TRAIN_VIDEO_SECONDS = 5.0
"""Moment-retrieval training skips videos shorter than this (reference ``min_video_len``)."""

RESUMABLE_CHANGES = ("train.epochs", "train.val_every", "train.num_workers", "train.device")
"""Config keys that may differ when a run is resumed (everything else must match the checkpoint)."""


@dataclass
class TrainResult:
    """Outcome of :func:`train_run`.

    Attributes:
        run_dir: the run directory.
        key_metric: metric that picked the best epoch.
        best_value: its best value (``None`` without validation).
        best_epoch: 1-based epoch of ``best.pt`` (``None`` without validation).
        best_metrics: validation metrics of that epoch.
        epochs: epochs completed.
        history: the metrics log, one record per completed epoch.
        paths: files of the run (``paths.best`` exists only when validation ran).
    """

    run_dir: Path
    key_metric: str
    best_value: float | None
    best_epoch: int | None
    best_metrics: dict[str, float]
    epochs: int
    history: list[dict[str, Any]] = field(default_factory=list)
    paths: RunPaths | None = None


class _TrainableQueries:
    """Loader query filter: membership in the ids of :func:`trainable_queries` (picklable for workers)."""

    def __init__(self, keep: set) -> None:
        self.keep = keep

    def __call__(self, query: Query) -> bool:
        return query.qid in self.keep


def domain_filter(cfg: RunConfig) -> Callable[[Query], bool] | None:
    """Keep only the queries of ``cfg.domain`` (YouTube Highlights / TVSum presets), else ``None``."""
    if not cfg.domain:
        return None
    domain = cfg.domain.lower()
    return lambda q: (q.domain or "").lower() == domain


def trainable_queries(store: FeatureStore, cfg: RunConfig, split: str) -> set:
    """Ids of the ``split`` queries that can be trained on (as the reference filters its train set)."""
    spec = get_dataset(cfg.dataset)
    in_domain = domain_filter(cfg)
    videos = set(store.video_ids())
    keep = set()
    for q in store.annotations():
        if q.split != split or q.vid not in videos or (in_domain is not None and not in_domain(q)):
            continue
        if spec.task == "mr" and q.duration < MIN_TRAIN_VIDEO_SECONDS:
            continue
        targets = query_targets(q, store.video_length(q.vid), store.video_fps(q.vid), spec)
        if len(targets.positives):
            keep.add(q.qid)
    return keep


def choose_val_split(store: FeatureStore, cfg: RunConfig) -> str | None:
    """``cfg.train.val_split`` if set, else ``val`` when the store has such queries, else ``test``, else
    ``None`` (queries outside ``cfg.domain`` do not count).

    Raises:
        ConfigError: ``cfg.train.val_split`` names a split the store has no queries of.
    """
    in_domain = domain_filter(cfg)
    present = {q.split for q in store.annotations() if in_domain is None or in_domain(q)}
    wanted = cfg.train.val_split
    if wanted is None:
        return next((s for s in ("val", "test") if s in present), None)
    if wanted not in present:
        raise ConfigError(
            f"train.val_split is {wanted!r} but the store has no such queries"
            + (f" of domain {cfg.domain!r}" if cfg.domain else "")
            + f" (its splits: {', '.join(sorted(present)) or 'none'}); set train.val_split to one of them"
        )
    return wanted


def train_loader(store_path: str | Path, cfg: RunConfig, split: str, keep: set, pin: bool) -> StreamingLoader:
    """Shuffled streaming loader over the trainable queries of ``split``."""
    config = LoaderConfig(
        batch_size=cfg.train.batch_size,
        videos_per_batch=cfg.train.pool_size,
        splits=(split,),
        shuffle=True,
        seed=cfg.train.seed,
        num_workers=cfg.train.num_workers,
        max_bytes=int(cfg.train.loader_memory_gb * 2**30),
        clamp_moments=False,
    )
    return StreamingLoader(store_path, config, query_filter=_TrainableQueries(keep), pin_memory=pin)


@dataclass
class RunData:
    """The data side of a run: what it reads, from where, onto which device. The sweep's shared pass
    makes one for the K models that share it.

    Attributes:
        store_path: the feature store.
        manifest: its manifest.
        identity: the manifest fields checkpoints record (:func:`train.compat.store_identity`).
        spec: the dataset.
        device: where batches go.
        train_split: split trained on.
        val_split: split validated on (``None``: no validation).
        loader: shuffled loader over the trainable queries of ``train_split``.
        val_loader: loader over ``val_split`` (``None`` without validation or without queries).
    """

    store_path: str | Path
    manifest: Manifest
    identity: dict[str, Any]
    spec: DatasetSpec
    device: torch.device
    train_split: str
    val_split: str | None
    loader: StreamingLoader
    val_loader: StreamingLoader | None

    def write_run_info(self, paths: RunPaths, cfg: RunConfig, amp: bool) -> None:
        """Write ``config.json`` (the resolved ``cfg``) and ``run.json`` (store, splits, device, AMP)."""
        write_json_atomic(paths.config, cfg.to_dict())
        write_json_atomic(paths.run, {
            "store": str(Path(self.store_path).resolve()),
            "manifest": self.manifest.to_attrs(),
            "train_split": self.train_split,
            "val_split": self.val_split,
            "train_queries": self.loader.num_queries,
            "device": str(self.device),
            "amp": amp,
        })


def open_run_data(cfg: RunConfig, store_path: str | Path, device: str) -> tuple[RunConfig, RunData]:
    """Open the store for ``cfg`` and select the data of the run.

    Returns:
        ``cfg`` with the store's token dims (:func:`train.compat.config_for_store`), and the data.

    Raises:
        StoreError: missing store, or one that does not fit ``cfg``.
        ConfigError: unknown device, no trainable queries in ``train.train_split``, or a
            ``train.val_split`` the store does not have.
    """
    store = open_store(store_path)
    cfg = config_for_store(cfg, store.manifest, store_path)
    torch_device = resolve_device(device)
    split = cfg.train.train_split
    keep = trainable_queries(store, cfg, split)
    if not keep:
        raise ConfigError(
            f"store {store_path} has no trainable queries in split {split!r}"
            + (f" of domain {cfg.domain!r}" if cfg.domain else "")
            + "; check train.train_split and the annotations"
        )
    val_split = choose_val_split(store, cfg)
    val_loader = None
    if val_split is not None:
        val_loader = validation_loader(store_path, cfg, val_split, query_filter=domain_filter(cfg))
        val_loader = val_loader if val_loader.num_queries else None
    data = RunData(
        store_path=store_path,
        manifest=store.manifest,
        identity=store_identity(store.manifest),
        spec=get_dataset(cfg.dataset),
        device=torch_device,
        train_split=split,
        val_split=val_split,
        loader=train_loader(store_path, cfg, split, keep, pin=torch_device.type == "cuda"),
        val_loader=val_loader,
    )
    return cfg, data


def pos_clip_generator(seed: int, pass_index: int) -> torch.Generator:
    """Generator of the positive-clip draws of one pass over the data, a pure function of its arguments."""
    state = np.random.SeedSequence([seed, pass_index, 7]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def epoch_inputs(
    loader: StreamingLoader, cfg: RunConfig, spec: DatasetSpec, device: torch.device, epoch: int
) -> Iterator[tuple[ModelInputs, int]]:
    """Model inputs of every batch of 0-based ``epoch`` (``cfg.train.repeat`` passes of ``loader``) with the
    number of queries in the batch. The order and the positive-clip draws depend on (seed, pass) only."""
    for r in range(cfg.train.repeat):
        pass_index = epoch * cfg.train.repeat + r
        loader.set_epoch(pass_index)
        generator = pos_clip_generator(cfg.train.seed, pass_index)
        for batch in loader:
            yield model_inputs(batch, spec, cfg.model.layers, device, generator), len(batch)


def train_epoch(
    state: TrainState, loader: StreamingLoader, spec: DatasetSpec, bar: tqdm | None = None
) -> dict[str, Any]:
    """Run ``cfg.train.repeat`` passes of the loader as epoch ``state.epoch``; returns the epoch's log."""
    stats = EpochStats(lr=state.schedule.lr_at(state.epoch, state.iteration))
    start = time.perf_counter()
    for inputs, size in epoch_inputs(loader, state.cfg, spec, state.device, state.epoch):
        out = train_step(state, inputs)
        stats.add(out, size)
        if bar is not None:
            rate = stats.samples / (time.perf_counter() - start)
            bar.update(size)
            bar.set_postfix(loss=f"{out['loss']:.4f}", sps=f"{rate:.1f}")
    return stats.record(time.perf_counter() - start)


def _check_resume_config(ckpt: Checkpoint, cfg: RunConfig) -> None:
    """Refuse to resume ``ckpt`` with a config that differs beyond :data:`RESUMABLE_CHANGES`.

    ``cfg`` has the store's token dims; a stored config without them (older runs) takes the same."""
    if ckpt.config is None:
        raise CheckpointError(
            f"{ckpt.path} holds no config; it was not written by `r2 train` and cannot be resumed"
        )
    stored_preset = ckpt.config.get("preset")
    if stored_preset != cfg.preset:
        raise CheckpointError(
            f"{ckpt.path} is a checkpoint of preset {stored_preset!r}, not {cfg.preset!r}; "
            f"resume with --preset {stored_preset} or choose another --out"
        )
    try:
        stored = with_token_dims(RunConfig.from_dict(ckpt.config), cfg.model.token_dims()).to_dict()
    except ConfigError as err:
        raise CheckpointError(f"{ckpt.path}: stored config is invalid: {err}") from None
    diffs = [
        f"{key}={old!r} -> {new!r}"
        for key, old, new in _diff(stored, cfg.to_dict())
        if key not in RESUMABLE_CHANGES
    ]
    if diffs:
        raise CheckpointError(
            f"cannot resume {ckpt.path} with another config ({'; '.join(diffs)}); "
            f"only {', '.join(RESUMABLE_CHANGES)} may change; use another --out for a new run"
        )


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append((f"{prefix}{key}", x, y))
    return out


def _resume(paths: RunPaths, cfg: RunConfig, store_path: str | Path, state: TrainState, best: Best) -> None:
    """Load ``last.pt`` into ``state`` and ``best``; checks preset, config and store first."""
    ckpt = read_checkpoint(paths.last)
    _check_resume_config(ckpt, cfg)
    meta = ckpt.meta
    if "train_state" not in meta or "rng" not in meta or "store" not in meta:
        raise CheckpointError(
            f"{paths.last} lacks the training state; it cannot be resumed (use another --out)"
        )
    open_store_for(meta["store"], store_path, f"checkpoint {paths.last}")
    load_weights(state.model, ckpt.state_dict, f"checkpoint {paths.last}", cfg)
    load_state_meta(state, meta["train_state"])
    restore_rng(meta["rng"])
    best.load_meta(meta.get("best") or {})


def train_run(
    cfg: RunConfig,
    store_path: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Train ``cfg`` on the store at ``store_path``, writing the run directory ``out_dir``.

    Trains on ``cfg.train.train_split`` and validates on ``cfg.train.val_split`` (default ``val`` if
    the store has it, else ``test``, else none). ``config.json`` and the checkpoints hold ``cfg`` with
    the store's token dims.

    Args:
        cfg: resolved run config (preset + overrides).
        store_path: feature store (see :mod:`shards.store`).
        out_dir: run directory; must be empty or absent unless ``resume``.
        resume: continue the run in ``out_dir`` from its ``last.pt`` (a fresh start when ``out_dir``
            is empty); ``cfg`` may differ from the stored config only in :data:`RESUMABLE_CHANGES`.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; fp16 AMP runs on CUDA when ``cfg.train.amp``.
        progress: show tqdm bars on stderr.

    Raises:
        RunDirError: ``out_dir`` holds an earlier run and ``resume`` is off.
        StoreError: missing store, or a store that does not fit ``cfg`` or the resumed checkpoint.
        CheckpointError: corrupt ``last.pt``, or one of another preset / config.
        ConfigError: no trainable queries, a missing validation split, unknown device, or a key metric
            validation does not report.
    """
    cfg, data = open_run_data(cfg, store_path, device)
    paths, resuming = prepare_run_dir(out_dir, resume)
    seed_everything(cfg.train.seed)
    state = build_state(cfg, data.device)
    best = Best(cfg.eval.key_metric)
    if resuming:
        _resume(paths, cfg, store_path, state, best)
        truncate_metrics(paths.metrics, state.epoch)
    data.write_run_info(paths, cfg, state.amp)

    while state.epoch < cfg.train.epochs:
        bar = tqdm(
            total=data.loader.num_queries * cfg.train.repeat,
            desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}",
            unit="q",
            disable=not progress,
            leave=False,
        )
        with bar:
            record: dict[str, Any] = {"epoch": state.epoch + 1}
            record.update(train_epoch(state, data.loader, data.spec, bar))
        state.epoch += 1
        record["iteration"] = state.iteration
        if data.val_loader is not None and validation_due(state.epoch, cfg.train.val_every, cfg.train.epochs):
            total = data.val_loader.num_queries
            with tqdm(total=total, desc="validate", unit="q", disable=not progress, leave=False) as vbar:
                validation = validate(state.model, data.val_loader, cfg, data.device, progress=vbar.update)
            record.update(record_validation(state, validation, best, paths, data.identity, data.val_split))
        end_epoch(state, record, best, paths, data.identity, capture_rng())

    return TrainResult(
        run_dir=paths.root,
        key_metric=best.metric,
        best_value=best.value,
        best_epoch=best.epoch,
        best_metrics=best.metrics,
        epochs=state.epoch,
        history=read_metrics(paths.metrics),
        paths=paths,
    )
