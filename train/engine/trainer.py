"""``r2 train``: a feature store in, a scored checkpoint out.

:func:`train_run` makes the device the current one, opens the run's data (:mod:`train.engine.rundata`),
checks that one step's estimated memory fits the device (:mod:`train.engine.memory`), prepares the run
directory (:mod:`train.engine.runlog`) and runs the one training loop (:mod:`train.engine.loop`) with one
model: optimizer steps (:mod:`train.engine.step`), validation every ``train.val_every`` epochs
(:mod:`train.engine.evaluate`), the best checkpoint by the dataset's key metric and the run's files
(:mod:`train.engine.records`), ``train.log`` and the TensorBoard scalars. CLIP is never loaded. An
interrupted run (a crash, Ctrl-C, SIGTERM) continues with ``resume=True`` from its last completed epoch,
bit-for-bit on CPU: weights, optimizer, scaler, counters and the python/numpy/torch generator states are
restored, and the loader order and positive-clip draws are pure functions of (seed, epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shards.device import use_device
from shards.errors import CheckpointError, ConfigError, option
from train.checkpoint import Checkpoint, load_weights, read_checkpoint
from train.compat import open_store_for, with_token_dims
from train.config import RunConfig
from train.engine.loop import Member, TrainLoop, new_member
from train.engine.memory import check_step_memory
from train.engine.rundata import open_run_data
from train.engine.runlog import RunPaths, prepare_run_dir, read_metrics, truncate_metrics
from train.engine.schedule import warn_short_warmup
from train.engine.step import load_state_meta

RESUMABLE_CHANGES = (
    "train.epochs",
    "train.val_every",
    "train.num_workers",
    "train.device",
    "train.cache",
    "train.cache_gb",
    "train.allow_missing",
    "train.save_every_epoch",
)
"""Config keys that may differ when a run is resumed (they change neither the batches nor the steps;
everything else must match the checkpoint)."""


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
            f"resume with {option('--preset', 'PRESET=')}{stored_preset} or choose another "
            f"{option('--out DIR', 'RUN=DIR')}"
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
            f"only {', '.join(RESUMABLE_CHANGES)} may change; use another {option('--out DIR', 'RUN=DIR')} "
            "for a new run"
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


def _resume(paths: RunPaths, cfg: RunConfig, store_path: str | Path, member: Member) -> None:
    """Load ``last.pt`` into ``member`` (weights, optimizer, counters, generator states, best epoch);
    checks preset, config and store first."""
    ckpt = read_checkpoint(paths.last)
    _check_resume_config(ckpt, cfg)
    meta = ckpt.meta
    if "train_state" not in meta or "rng" not in meta or "store" not in meta:
        raise CheckpointError(
            f"{paths.last} lacks the training state; it cannot be resumed (use another "
            f"{option('--out DIR', 'RUN=DIR')})"
        )
    open_store_for(meta["store"], store_path, f"checkpoint {paths.last}")
    load_weights(member.state.model, ckpt.state_dict, f"checkpoint {paths.last}", cfg)
    load_state_meta(member.state, meta["train_state"])
    member.rng = meta["rng"]
    member.best.load_meta(meta.get("best") or {})


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
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (made the current CUDA device, so that no
            context opens on another GPU); fp16 AMP runs on CUDA when ``cfg.train.amp``.
        progress: show tqdm bars on stderr, log the start and epoch lines (logging INFO; ``train.log``
            gets them either way) and the warning of a run that never leaves the warm-up
            (:func:`train.engine.schedule.warn_short_warmup`); a sweep's trials turn all off (the sweep
            warns once for all its trials).

    Raises:
        RunDirError: ``out_dir`` holds an earlier run and ``resume`` is off.
        StoreError: missing store, or a store that does not fit ``cfg`` or the resumed checkpoint.
        CheckpointError: corrupt ``last.pt``, or one of another preset / config.
        ConfigError: no trainable queries, a missing validation split, unknown device, a step whose
            estimated memory does not fit the GPU's free memory (checked before the model is built,
            :func:`train.engine.memory.check_step_memory`), or a key metric validation does not report.
        KeyboardInterrupt: Ctrl-C, or SIGTERM inside :func:`shards.cliutil.sigterm_as_interrupt`: the run
            stops with the files of its last finished epoch and ``run.json``'s ``interrupted`` record
            (:mod:`train.engine.loop`); ``resume=True`` continues it.
    """
    cfg, data = open_run_data(cfg, store_path, str(use_device(device)))
    check_step_memory(cfg, data.extent, data.device)
    paths, resuming = prepare_run_dir(out_dir, resume)
    member = new_member(cfg, data, paths)
    if resuming:
        _resume(paths, cfg, store_path, member)
        truncate_metrics(paths.metrics, member.state.epoch)
    data.write_run_info(paths, cfg, member.state.amp)
    if progress:
        warn_short_warmup([(cfg, data.steps_per_epoch(cfg))])
    TrainLoop(data, [member], progress=progress).run()
    best = member.best

    return TrainResult(
        run_dir=paths.root,
        key_metric=best.metric,
        best_value=best.value,
        best_epoch=best.epoch,
        best_metrics=best.metrics,
        epochs=member.state.epoch,
        history=read_metrics(paths.metrics),
        paths=paths,
    )
