"""K sweep trials trained on one shared pass over the store: each batch is read once, K models step on it.

Trials may share a pass when their resolved configs differ only in model, loss, optimizer or
evaluation knobs (not in ``model.arch``, the token dims or ``model.layers``, which decide the tokens
fed, nor in any ``train.*`` key but ``train.amp``: batch size, seed, epochs, repeat, pool size,
splits and loader workers fix the batches), when the loader runs in the trial process
(``train.num_workers=0``), when none of them has a ``last.pt`` to continue from, and when K models fit
in memory together (:func:`group_requests`).

The set-up (:func:`train.engine.trainer.open_run_data`), the epoch's batches
(:func:`train.engine.trainer.epoch_inputs`) and every file of a trial folder
(:mod:`train.engine.records`) are the trainer's own.

Same results as separate runs. ``train.engine.trainer.train_run`` seeds every global generator with
``train.seed`` (:func:`train.engine.rng.seed_everything`), builds the model, then draws from the global
torch generator only inside optimizer steps (dropout, drop-path); batch order and positive-clip draws
come from generators that are pure functions of (seed, pass). The shared pass gives every model its
own copy of the global generator states: it seeds and builds each model exactly as ``train_run`` does,
captures the states (:func:`train.engine.rng.capture_rng`), and around each of that model's steps restores
them and captures them again. So each model sees the random stream a separate run of its config
would see; on CPU its weights, losses and metrics are bit-identical to ``train_run``'s (tested), and
its ``last.pt`` holds its own generator states, so an interrupted trial resumes alone with
``train_run(resume=True)``. Each trial folder gets the files ``train_run`` writes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from shards.errors import ConfigError
from shards.store import open_store
from train.compat import config_for_store
from train.config import RunConfig
from train.data.batching import ModelInputs
from train.engine.evaluate import predict_batch, score_predictions
from train.engine.records import Best, EpochStats, end_epoch, record_validation, validation_due
from train.engine.rng import capture_rng, restore_rng, seed_everything
from train.engine.runlog import RunPaths, prepare_run_dir
from train.engine.step import TrainState, build_state, resolve_device, train_step
from train.engine.trainer import epoch_inputs, open_run_data
from train.model import R2Tuning, count_parameters
from train.sweep.config import fresh_trial_dir, request_config, result_metrics
from train.sweep.trials import (
    TrialRecord,
    TrialRequest,
    fail_trial,
    finish_trial,
    set_torch_threads,
    start_trial,
)

SHARED_MODEL_SECTIONS = ("model", "loss", "optim", "eval")
"""Config sections whose keys may differ between trials of one shared pass ..."""
DATA_MODEL_KEYS = ("arch", "video_tokens", "video_width", "text_width", "layers")
"""... except these model keys, which decide the tokens the loader feeds."""
MEMORY_FRACTION = 0.6
"""Share of the free memory (per worker) that the models of one shared pass may take."""
_ACTIVATION_FACTOR = 6
"""(B, T, P, D) float32 activations kept per fused layer for backward (maps, pooling, dropout masks)."""


def data_key(cfg: RunConfig) -> str:
    """Everything of ``cfg`` that decides the batches; trials with equal keys can share a pass."""
    data = cfg.to_dict()
    model = {k: data["model"][k] for k in DATA_MODEL_KEYS}
    for section in SHARED_MODEL_SECTIONS:
        data.pop(section)
    data["model"] = model
    data["train"].pop("amp")
    return json.dumps(data, sort_keys=True)


def model_bytes(cfg: RunConfig, max_clips: int) -> int:
    """Rough training memory of one model (bytes): weights, gradients and AdamW moments
    (16 bytes/parameter), its own float32 copy of the batch's video tokens with the TEF appended
    ``(B, T, k, P, C + 2)`` and the per-layer activations ``(B, T, P, D)``.

    ``max_clips`` is the longest video of the store (T).
    """
    with torch.device("meta"):
        params = count_parameters(R2Tuning(cfg.model, cfg.loss))
    m = cfg.model
    p, c, _ = m.token_dims()
    tokens = cfg.train.batch_size * max_clips * m.layers * p
    return 16 * params + 4 * tokens * (c + 2 + _ACTIVATION_FACTOR * m.dims)


def shared_bytes(cfg: RunConfig, max_clips: int) -> int:
    """Memory of the batch all models read: float32 video tokens ``(B, T, k, P, C)`` (bytes)."""
    p, c, _ = cfg.model.token_dims()
    return 4 * cfg.train.batch_size * max_clips * cfg.model.layers * p * c


def memory_budget(device: str, workers: int) -> int:
    """Bytes the models of one shared pass may use: a share of the free GPU memory for CUDA trials,
    else of the available host memory divided among ``workers`` worker processes."""
    target = resolve_device(device)
    if target.type == "cuda":
        free, _ = torch.cuda.mem_get_info(target)
        return int(MEMORY_FRACTION * free)
    return int(MEMORY_FRACTION * psutil.virtual_memory().available / max(workers, 1))


def max_models(cfg: RunConfig, max_clips: int, budget: int) -> int:
    """How many models of ``cfg`` fit in ``budget`` bytes next to one shared batch (at least 1)."""
    room = budget - shared_bytes(cfg, max_clips)
    return max(1, room // max(model_bytes(cfg, max_clips), 1))


def _store_max_clips(store: str) -> int:
    handle = open_store(store)
    return max((handle.video_length(v) for v in handle.video_ids()), default=1)


def _split_even(items: list, parts: int) -> list[list]:
    """``items`` in ``parts`` contiguous chunks whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        stop = start + size + (i < extra)
        chunks.append(items[start:stop])
        start = stop
    return chunks


def group_requests(pending: list[TrialRequest], *, slots: int, mode: str) -> list[list[TrialRequest]]:
    """Tasks for ``pending`` trials: shared-pass groups of compatible trials, else single trials.

    ``mode='on'`` makes each set of compatible trials as few groups as memory allows. ``mode='auto'``
    shares only when there are more compatible trials than ``slots`` (workers that would otherwise
    run them side by side): it splits them into ``slots`` groups (more if memory demands), so every
    worker stays busy and each batch is read once per worker instead of once per trial. With one slot
    (one GPU) all compatible trials share one pass.
    """
    if mode == "off" or len(pending) < 2:
        return [[r] for r in pending]
    sets: dict[str, list[TrialRequest]] = {}
    singles: list[list[TrialRequest]] = []
    configs: dict[int, RunConfig] = {}
    for request in pending:
        cfg = request_config(request)
        if cfg.train.num_workers != 0 or (Path(request.trial_dir) / "last.pt").is_file():
            singles.append([request])
            continue
        configs[request.index] = cfg
        sets.setdefault(data_key(cfg), []).append(request)
    tasks = list(singles)
    for members in sets.values():
        if len(members) == 1 or (mode == "auto" and len(members) <= slots):
            tasks += [[r] for r in members]
            continue
        max_clips = _store_max_clips(members[0].store)
        budget = memory_budget(members[0].device, 1 if mode == "on" else slots)
        fit = min(max_models(configs[r.index], max_clips, budget) for r in members)
        parts = math.ceil(len(members) / fit) if mode == "on" else max(slots, math.ceil(len(members) / fit))
        tasks += [chunk for chunk in _split_even(members, min(parts, len(members))) if chunk]
    return sorted(tasks, key=lambda task: task[0].index)


@dataclass
class _Member:
    """One model of the shared pass, with the bookkeeping ``train_run`` keeps for a single model."""

    request: TrialRequest
    state: TrainState
    paths: RunPaths
    rng: dict[str, Any]
    best: Best
    stats: EpochStats | None = None
    error: BaseException | None = None

    def step(self, inputs: ModelInputs, size: int) -> None:
        """One optimizer step of this model on ``inputs`` with its own global-generator states."""
        restore_rng(self.rng)
        try:
            out = train_step(self.state, inputs)
        finally:
            self.rng = capture_rng()
        self.stats.add(out, size)


class SharedPass:
    """Set-up and loop of one shared pass (``train.engine.trainer.train_run`` for K models).

    Args:
        requests: the trials (same store, same device, compatible configs).
        configs: their resolved configs, in the same order.
    """

    def __init__(self, requests: list[TrialRequest], configs: list[RunConfig]) -> None:
        if len({data_key(c) for c in configs}) != 1:
            raise ValueError("trials of a shared pass must have the same data settings (see data_key)")
        store = requests[0].store
        self.cfg, self.data = open_run_data(configs[0], store, requests[0].device)
        configs = [config_for_store(c, self.data.manifest, store) for c in configs]
        self.members: list[_Member] = []
        for request, cfg in zip(requests, configs, strict=True):
            paths, _ = prepare_run_dir(request.trial_dir, resume=False)
            seed_everything(cfg.train.seed)
            state = build_state(cfg, self.data.device)
            self.members.append(_Member(request, state, paths, capture_rng(), Best(cfg.eval.key_metric)))
            self.data.write_run_info(paths, cfg, state.amp)

    @property
    def alive(self) -> list[_Member]:
        return [m for m in self.members if m.error is None]

    def _train_epoch(self, epoch: int) -> float:
        """Epoch ``epoch`` (0-based) of every model; returns its wall time in seconds."""
        for m in self.alive:
            m.stats = EpochStats(lr=m.state.schedule.lr_at(m.state.epoch, m.state.iteration))
        start = time.perf_counter()
        data = self.data
        for inputs, size in epoch_inputs(data.loader, self.cfg, data.spec, data.device, epoch):
            for m in self.alive:
                try:
                    m.step(inputs, size)
                except Exception as err:
                    m.error = err
        return time.perf_counter() - start

    def _validate(self, records: dict[int, dict[str, Any]]) -> None:
        """One read of the validation split; every model predicts each batch, then ranks its predictions."""
        data = self.data
        predictions: dict[int, list] = {id(m): [] for m in self.alive}
        start = time.perf_counter()
        for batch in data.val_loader:
            for m in self.alive:
                predictions[id(m)] += predict_batch(m.state.model, batch, data.spec, m.state.cfg, data.device)
        seconds = time.perf_counter() - start
        queries = data.val_loader.dataset.queries
        for m in self.alive:
            try:
                validation = score_predictions(data.spec.name, predictions[id(m)], queries, seconds)
                records[id(m)].update(
                    record_validation(m.state, validation, m.best, m.paths, data.identity, data.val_split)
                )
            except Exception as err:
                m.error = err

    def run(self) -> None:
        """Train all models for ``train.epochs`` epochs, validating as ``train_run`` does."""
        cfg = self.cfg
        for epoch in range(cfg.train.epochs):
            seconds = self._train_epoch(epoch)
            records: dict[int, dict[str, Any]] = {}
            for m in self.alive:
                m.state.epoch += 1
                records[id(m)] = {"epoch": m.state.epoch, **m.stats.record(seconds)}
                records[id(m)]["iteration"] = m.state.iteration
            due = validation_due(epoch + 1, cfg.train.val_every, cfg.train.epochs)
            if self.data.val_loader is not None and due:
                self._validate(records)
            for m in self.alive:
                try:
                    end_epoch(m.state, records[id(m)], m.best, m.paths, self.data.identity, m.rng)
                except Exception as err:
                    m.error = err
            if not self.alive:
                return


def run_shared_trials(requests: list[TrialRequest]) -> list[TrialRecord]:
    """Train ``requests`` on one shared data pass in this process; one record per trial.

    A trial whose step, validation or files fail is recorded as failed and dropped from the pass;
    the others go on. A failure of the common set-up fails them all.
    """
    set_torch_threads(requests[0].threads)
    start = time.perf_counter()
    for request in requests:
        start_trial(request)
    try:
        for request in requests:
            fresh_trial_dir(Path(request.trial_dir))
        shared = SharedPass(requests, [request_config(r) for r in requests])
        shared.run()
    except Exception as err:
        return [fail_trial(r, err, time.perf_counter() - start) for r in requests]
    seconds = time.perf_counter() - start
    records = []
    for m in shared.members:
        if m.error is None:
            try:
                metrics = result_metrics(m.best.metrics, m.best.epoch, m.state.epoch)
            except ConfigError as err:
                m.error = err
            else:
                records.append(finish_trial(m.request, metrics, seconds, shared=len(requests)))
                continue
        records.append(fail_trial(m.request, m.error, seconds))
    return records
