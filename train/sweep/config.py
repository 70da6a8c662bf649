"""The sweep's view of the run configuration, the store and the trainer.

- :func:`store_arch` / :func:`trial_config`: a trial's :class:`RunConfig` is its preset for the store's
  backbone, then the sweep's fixed overrides, then its own, with the store's token dims.
- :func:`check_sweep`: fail before anything runs (unknown key, bad value, store that does not fit
  the preset, no validation split to rank the trials by).
- :func:`train_trial`: the default trial function, ``train.engine.trainer.train_run`` into the trial folder
  (continuing from its ``last.pt`` when an earlier attempt was interrupted after an epoch).

Kept apart from :mod:`train.sweep` so that planning and bookkeeping import neither torch nor the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from shards.backbones import normalize_backbone
from shards.datasets import get_dataset
from shards.errors import ConfigError
from shards.store import Manifest, open_store
from train.compat import config_for_store
from train.config import RunConfig, apply_overrides, get_preset
from train.sweep.trials import TrialRequest

NUM_WORKERS_KEY = "train.num_workers"
"""Loader worker processes of a trial; the sweep fixes it to 0 unless ``--set`` says otherwise
(trials run side by side in their own processes; batches depend on the worker count)."""


def store_arch(manifest: Manifest) -> str:
    """Backbone name of a store for ``model.arch`` (its token dims come from the manifest)."""
    return normalize_backbone(manifest.backbone)


def config_on_store(preset: str, manifest: Manifest, store: str | Path, overrides: list[str]) -> RunConfig:
    """The preset for the backbone of the store with ``manifest``, then ``overrides``, with the store's
    token dims (:func:`train.compat.config_for_store`).

    Raises:
        ConfigError: unknown preset or key, bad value. StoreError: a store that does not fit.
    """
    cfg = apply_overrides(get_preset(preset, arch=store_arch(manifest)), overrides)
    return config_for_store(cfg, manifest, store)


def trial_config(preset: str, store: str | Path, overrides: list[str]) -> RunConfig:
    """:func:`config_on_store` for the store at ``store`` with ``overrides`` (``["key=value", ...]``).

    Raises:
        ConfigError: unknown preset or key, bad value. StoreError: unreadable store, or one that does not fit.
    """
    return config_on_store(preset, open_store(store).manifest, store, overrides)


def request_config(request: TrialRequest) -> RunConfig:
    """:func:`trial_config` of a trial request."""
    return trial_config(request.preset, request.store, request.override_list())


def with_loader_default(fixed: dict[str, str]) -> dict[str, str]:
    """``fixed`` plus ``train.num_workers=0`` unless the user set the loader workers."""
    if NUM_WORKERS_KEY in fixed:
        return dict(fixed)
    return {NUM_WORKERS_KEY: "0", **fixed}


def check_sweep(preset: str, store: str | Path, trials: list[list[str]]) -> tuple[str, bool, str]:
    """Check every trial's overrides and the store before a sweep starts.

    Returns:
        the key metric that ranks the trials, whether higher is better (always ``True``: the
        reference's key metrics are recalls / mAPs) and the store's backbone name.

    Raises:
        ConfigError: a bad override (the message names it), or a trial without a validation split.
        StoreError: a store that does not fit the preset.
    """
    from train.engine.rundata import choose_val_split

    handle = open_store(store)
    for overrides in trials:
        cfg = config_on_store(preset, handle.manifest, store, overrides)
        if choose_val_split(handle, cfg) is None:
            raise ConfigError(f"store {store} has no 'val' or 'test' queries for preset {preset!r}: "
                              "a sweep ranks trials by validation metrics (or --set train.val_split=NAME)")
    return get_dataset(get_preset(preset).dataset).key_metric, True, store_arch(handle.manifest)


def fresh_trial_dir(trial_dir: Path) -> bool:
    """Empty ``trial_dir`` unless it holds a ``last.pt`` to continue from; returns whether it does."""
    if (trial_dir / "last.pt").is_file():
        return True
    if trial_dir.exists():
        shutil.rmtree(trial_dir)
    trial_dir.mkdir(parents=True)
    return False


def result_metrics(best_metrics: dict[str, float], best_epoch: int | None, epochs: int) -> dict[str, float]:
    """Metrics a trial reports: the validation metrics of its best epoch, that epoch and epochs run."""
    if not best_metrics or best_epoch is None:
        raise ConfigError("the run produced no validation metrics (no validation split?)")
    return {**best_metrics, "best_epoch": float(best_epoch), "epochs": float(epochs)}


def train_trial(request: TrialRequest) -> dict[str, float]:
    """Train one trial with ``train.engine.trainer.train_run`` in ``request.trial_dir``.

    The folder ends up as ``train_run`` leaves it (config.json, run.json, metrics.jsonl, last.pt, best.pt,
    best.json, val_preds.jsonl); the sweep adds ``done.json``. An earlier interrupted attempt with a
    ``last.pt`` is continued, any other leftover is removed first.
    """
    from train.engine.trainer import train_run

    cfg = request_config(request)
    trial_dir = Path(request.trial_dir)
    resume = fresh_trial_dir(trial_dir)
    result = train_run(cfg, request.store, trial_dir, resume=resume, device=request.device, progress=False)
    return result_metrics(result.best_metrics, result.best_epoch, result.epochs)

