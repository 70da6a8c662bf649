"""Score a checkpoint on any split of a store with exactly the validation path of training.

:func:`score_checkpoint` opens the store with the identity the checkpoint records (a checkpoint of
another store is refused), then runs what the training loop runs at each validation
(:mod:`train.engine.loop`): :func:`~train.engine.evaluate.validation_loader` with the checkpoint's
config, :func:`~train.engine.evaluate.predict_batch` and
:func:`~train.engine.evaluate.score_predictions`. ``best.pt`` scored on the split it was validated on
therefore reproduces ``best.json``. A split without ground truth (QVHighlights ``test``) is predicted
but not scored: its predictions are a leaderboard submission.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from eval.predictions import QueryPrediction
from shards.datasets import DatasetSpec, get_dataset
from shards.device import use_device
from shards.errors import CheckpointError, ConfigError
from shards.schema import Query
from shards.store import open_store
from train.checkpoint import load_checkpoint, read_checkpoint
from train.compat import config_for_store, open_store_for
from train.engine.evaluate import (
    Validation,
    check_predictable,
    predict_batch,
    score_predictions,
    validation_loader,
)
from train.engine.rundata import domain_filter


@dataclass
class CheckpointScore:
    """Outcome of :func:`score_checkpoint`.

    Attributes:
        checkpoint: the checkpoint file.
        spec: its dataset.
        split: the split predicted.
        validation: the predictions (post-processed, submission records) and, when ``labelled``, the
            metrics (``metrics``: the headline keys, as in ``best.json``; ``report``: the whole result).
        labelled: whether the split has ground truth (else nothing was scored).
        missing: annotated queries of the split without tokens in the store, left out
            (``allow_missing``).
    """

    checkpoint: Path
    spec: DatasetSpec
    split: str
    validation: Validation
    labelled: bool
    missing: list[Query]

    @property
    def predictions(self) -> list[QueryPrediction]:
        return self.validation.predictions


def default_predictions_path(checkpoint: str | Path, split: str) -> Path:
    """``<checkpoint folder>/<checkpoint stem>_<split>_preds.jsonl``, e.g. ``runs/x/best_test_preds.jsonl``
    (never a file training writes, such as ``val_preds.jsonl``)."""
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}_{split}_preds.jsonl")


def check_output(out: str | Path, checkpoint: str | Path, store: str | Path) -> Path:
    """``out`` if writing predictions there overwrites neither the checkpoint nor a file of the store.

    Raises:
        ConfigError: ``out`` is the checkpoint, inside the store, or a folder.
    """
    out = Path(out)
    target = out.resolve()
    if target == Path(checkpoint).resolve() or target.is_relative_to(Path(store).resolve()):
        raise ConfigError(
            f"--out {out} would overwrite an input (the checkpoint or the store); choose another path"
        )
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the predictions file, e.g. {out / 'preds.jsonl'}")
    return out


def score_checkpoint(
    checkpoint: str | Path,
    store: str | Path,
    split: str,
    allow_missing: bool = False,
    device: str = "auto",
    progress: bool = False,
) -> CheckpointScore:
    """Predict every query of ``split`` with a checkpoint written by ``r2 train`` and score them.

    Args:
        checkpoint: ``best.pt`` / ``last.pt`` of a run (its config and store identity are in the file).
        store: the feature store; it must have the identity recorded in the checkpoint.
        split: annotation split to predict (``val``, ``test``, ...); queries outside the config's
            domain (YouTube Highlights / TVSum presets) are left out, as in training.
        allow_missing: predict the queries that have tokens when some annotated ones have none,
            instead of failing (:func:`train.engine.evaluate.check_predictable`).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        progress: a tqdm bar on stderr.

    Raises:
        CheckpointError: missing or corrupt file, one without a config (not written by ``r2 train``), or
            weights that do not fit it.
        StoreError: missing store, another store than the checkpoint's, or annotated queries without
            tokens (unless ``allow_missing``).
        ConfigError: a split the store has no queries of, or an unknown device.
    """
    path = Path(checkpoint)
    ckpt = read_checkpoint(path)
    if ckpt.config is None:
        raise CheckpointError(
            f"{path} holds no config (an official checkpoint or a bare state dict?); r2 eval --checkpoint "
            "scores checkpoints written by r2 train (best.pt, last.pt)"
        )
    identity = ckpt.meta.get("store")
    opened = open_store_for(identity, store, f"checkpoint {path}") if identity else open_store(store)
    torch_device = use_device(device)
    model, cfg, _ = load_checkpoint(path, device=torch_device)
    cfg = config_for_store(cfg, opened.manifest, store)
    spec = get_dataset(cfg.dataset)
    in_domain = domain_filter(cfg)
    splits = {q.split for q in opened.annotations() if in_domain is None or in_domain(q)}
    if split not in splits:
        raise ConfigError(
            f"store {store} has no {split!r} queries"
            + (f" of domain {cfg.domain!r}" if cfg.domain else "")
            + f" (its splits: {', '.join(sorted(splits)) or 'none'}); pass one of them to --split"
        )
    missing = check_predictable(opened, split, in_domain, allow_missing)
    loader = validation_loader(store, cfg, split, query_filter=in_domain)
    predictions: list[QueryPrediction] = []
    start = time.perf_counter()
    with tqdm(total=loader.num_queries, desc=f"predict {split}", unit="q", disable=not progress) as bar:
        for batch in loader:
            predictions += predict_batch(model, batch, spec, cfg, torch_device)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    queries = loader.dataset.queries
    labelled = any(q.moments or q.saliency for q in queries)
    validation = (
        score_predictions(spec.name, predictions, queries, seconds)
        if labelled
        else Validation({}, predictions, queries, seconds)
    )
    return CheckpointScore(path, spec, split, validation, labelled, missing)
