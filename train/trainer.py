"""The training loop: a feature store in, a scored checkpoint out.

:func:`train_run` streams the store's ``train`` split with :class:`shards.loader.StreamingLoader`
(queries of one video share one read of its tokens), takes optimizer steps with :mod:`train.step`,
validates every ``train.val_every`` epochs with :mod:`train.evaluate`, keeps the best checkpoint on
the preset's key metric and writes the run directory described in :mod:`train.runlog`. CLIP is
never loaded. An interrupted run continues with ``resume=True`` from its last completed epoch,
bit-for-bit on CPU: weights, optimizer, scaler, counters and the python/numpy/torch generator states
are restored, and the loader order and positive-clip draws are pure functions of (seed, epoch).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from eval.predictions import write_predictions
from shards.datasets import DatasetSpec, get_dataset
from shards.errors import CheckpointError, ConfigError
from shards.loader import LoaderConfig, StreamingLoader
from shards.schema import Query
from shards.store import FeatureStore, open_store
from train.batching import model_inputs
from train.checkpoint import Checkpoint, load_weights, read_checkpoint, save_checkpoint
from train.compat import check_config_store, open_store_for, store_identity
from train.config import RunConfig
from train.evaluate import Validation, validate, validation_loader
from train.rng import capture_rng, restore_rng, seed_everything
from train.runlog import (
    RunPaths,
    append_metrics,
    prepare_run_dir,
    read_metrics,
    truncate_metrics,
    write_json_atomic,
)
from train.step import TrainState, build_state, load_state_meta, resolve_device, state_meta, train_step
from train.targets_data import query_targets

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


def choose_val_split(store: FeatureStore, cfg: RunConfig, val_split: str | None) -> str | None:
    """``val_split`` if given, else ``val`` when the store has such queries, else ``test``, else ``None``."""
    if val_split:
        return val_split
    in_domain = domain_filter(cfg)
    present = {q.split for q in store.annotations() if in_domain is None or in_domain(q)}
    return next((s for s in ("val", "test") if s in present), None)


def train_loader(store_path: str | Path, cfg: RunConfig, split: str, keep: set, pin: bool) -> StreamingLoader:
    """Shuffled streaming loader over the trainable queries of ``split``."""
    config = LoaderConfig(
        batch_size=cfg.train.batch_size,
        videos_per_batch=cfg.train.pool_size,
        splits=(split,),
        shuffle=True,
        seed=cfg.train.seed,
        num_workers=cfg.train.num_workers,
        clamp_moments=False,
    )
    return StreamingLoader(store_path, config, query_filter=_TrainableQueries(keep), pin_memory=pin)


def pos_clip_generator(seed: int, pass_index: int) -> torch.Generator:
    """Generator of the positive-clip draws of one pass over the data, a pure function of its arguments."""
    state = np.random.SeedSequence([seed, pass_index, 7]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def train_epoch(
    state: TrainState, loader: StreamingLoader, spec: DatasetSpec, bar: tqdm | None = None
) -> dict[str, Any]:
    """Run ``cfg.train.repeat`` passes of the loader as epoch ``state.epoch``; returns the epoch's log."""
    cfg = state.cfg
    totals: dict[str, float] = {}
    steps = skipped = samples = 0
    lr = state.schedule.lr_at(state.epoch, state.iteration)
    start = time.perf_counter()
    for r in range(cfg.train.repeat):
        pass_index = state.epoch * cfg.train.repeat + r
        loader.set_epoch(pass_index)
        generator = pos_clip_generator(cfg.train.seed, pass_index)
        for batch in loader:
            inputs = model_inputs(batch, spec, cfg.model.layers, state.device, generator)
            out = train_step(state, inputs)
            lr = out.pop("lr")
            skipped += int(out.pop("skipped"))
            out.pop("grad_norm")
            for name, value in out.items():
                totals[name] = totals.get(name, 0.0) + value
            steps += 1
            samples += len(batch)
            if bar is not None:
                elapsed = time.perf_counter() - start
                bar.update(len(batch))
                bar.set_postfix(loss=f"{out['loss']:.4f}", sps=f"{samples / elapsed:.1f}")
    seconds = time.perf_counter() - start
    return {
        "train": {name: value / max(steps, 1) for name, value in totals.items()},
        "lr": lr,
        "steps": steps,
        "skipped_steps": skipped,
        "samples": samples,
        "samples_per_s": samples / seconds if seconds > 0 else 0.0,
        "train_seconds": seconds,
    }


def _check_resume_config(ckpt: Checkpoint, cfg: RunConfig) -> None:
    """Refuse to resume ``ckpt`` with a config that differs beyond :data:`RESUMABLE_CHANGES`."""
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
        stored = RunConfig.from_dict(ckpt.config).to_dict()
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


@dataclass
class _Best:
    metric: str
    value: float | None = None
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def improves(self, value: float) -> bool:
        return self.value is None or value > self.value


def _resume(paths: RunPaths, cfg: RunConfig, store_path: str | Path, state: TrainState, best: _Best) -> None:
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
    saved = meta.get("best") or {}
    best.value, best.epoch = saved.get("value"), saved.get("epoch")
    best.metrics = dict(saved.get("metrics") or {})


def _key_value(validation: Validation, key: str) -> float:
    if key not in validation.metrics:
        known = ", ".join(sorted(validation.metrics))
        raise ConfigError(
            f"key metric {key!r} is not among the validation metrics ({known}); "
            "set eval.key_metric to one of them"
        )
    return validation.metrics[key]


def _validate_epoch(
    state: TrainState,
    loader: StreamingLoader,
    best: _Best,
    paths: RunPaths,
    identity: dict[str, Any],
    split: str,
    progress: bool,
) -> dict[str, Any]:
    """Validate after epoch ``state.epoch``; a new best writes best.pt, best.json and val_preds.jsonl.

    Returns the metrics-log fields of the validation.
    """
    cfg = state.cfg
    with tqdm(total=loader.num_queries, desc="validate", unit="q", disable=not progress, leave=False) as bar:
        validation = validate(state.model, loader, cfg, state.device, progress=bar.update)
    value = _key_value(validation, best.metric)
    if best.improves(value):
        best.value, best.epoch, best.metrics = value, state.epoch, validation.metrics
        write_predictions(paths.val_preds, validation.predictions)
        meta = {"epoch": state.epoch, "metrics": validation.metrics, "store": identity, "split": split}
        save_checkpoint(paths.best, state.model, cfg, meta)
        write_json_atomic(paths.best_json, {
            "epoch": state.epoch, "key_metric": best.metric, "value": value, "split": split,
            "metrics": validation.metrics,
        })
    return {"val": validation.metrics, "val_samples_per_s": validation.samples_per_s}


def train_run(
    cfg: RunConfig,
    store_path: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
    *,
    train_split: str = "train",
    val_split: str | None = None,
) -> TrainResult:
    """Train ``cfg`` on the store at ``store_path``, writing the run directory ``out_dir``.

    Args:
        cfg: resolved run config (preset + overrides).
        store_path: feature store (see :mod:`shards.store`).
        out_dir: run directory; must be empty or absent unless ``resume``.
        resume: continue the run in ``out_dir`` from its ``last.pt`` (a fresh start when ``out_dir``
            is empty); ``cfg`` may differ from the stored config only in :data:`RESUMABLE_CHANGES`.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; fp16 AMP runs on CUDA when ``cfg.train.amp``.
        progress: show tqdm bars on stderr.
        train_split: split trained on.
        val_split: split validated on; default ``val`` if the store has it, else ``test``, else none.

    Raises:
        RunDirError: ``out_dir`` holds an earlier run and ``resume`` is off.
        StoreError: missing store, or a store that does not fit ``cfg`` or the resumed checkpoint.
        CheckpointError: corrupt ``last.pt``, or one of another preset / config.
        ConfigError: no trainable queries, unknown device, or a key metric validation does not report.
    """
    store = open_store(store_path)
    check_config_store(cfg, store.manifest, store_path)
    spec = get_dataset(cfg.dataset)
    torch_device = resolve_device(device)
    keep = trainable_queries(store, cfg, train_split)
    if not keep:
        raise ConfigError(
            f"store {store_path} has no trainable queries in split {train_split!r}"
            + (f" of domain {cfg.domain!r}" if cfg.domain else "")
            + "; check the split names and annotations"
        )
    val_split = choose_val_split(store, cfg, val_split)
    paths, resuming = prepare_run_dir(out_dir, resume)

    seed_everything(cfg.train.seed)
    state = build_state(cfg, torch_device)
    best = _Best(cfg.eval.key_metric)
    if resuming:
        _resume(paths, cfg, store_path, state, best)
        truncate_metrics(paths.metrics, state.epoch)
    loader = train_loader(store_path, cfg, train_split, keep, pin=torch_device.type == "cuda")
    write_json_atomic(paths.config, cfg.to_dict())
    write_json_atomic(
        paths.run,
        {
            "store": str(Path(store_path).resolve()),
            "manifest": store.manifest.to_attrs(),
            "train_split": train_split,
            "val_split": val_split,
            "train_queries": loader.num_queries,
            "device": str(torch_device),
            "amp": state.amp,
        },
    )
    val_loader = None
    if val_split is not None:
        val_loader = validation_loader(store_path, cfg, val_split, query_filter=domain_filter(cfg))
        if val_loader.num_queries == 0:
            val_loader = None
    identity = store_identity(store.manifest)

    while state.epoch < cfg.train.epochs:
        bar = tqdm(
            total=loader.num_queries * cfg.train.repeat,
            desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}",
            unit="q",
            disable=not progress,
            leave=False,
        )
        with bar:
            record: dict[str, Any] = {"epoch": state.epoch + 1, **train_epoch(state, loader, spec, bar)}
        state.epoch += 1
        record["iteration"] = state.iteration
        due = state.epoch % cfg.train.val_every == 0 or state.epoch == cfg.train.epochs
        if val_loader is not None and due:
            record.update(_validate_epoch(state, val_loader, best, paths, identity, val_split, progress))
        append_metrics(paths.metrics, record)
        save_checkpoint(paths.last, state.model, cfg, {
            "train_state": state_meta(state),
            "rng": capture_rng(),
            "best": {"metric": best.metric, "value": best.value, "epoch": best.epoch,
                     "metrics": best.metrics},
            "store": identity,
            "loader": {"seed": cfg.train.seed, "passes_done": state.epoch * cfg.train.repeat},
        })

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
