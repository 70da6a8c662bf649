"""K sweep trials trained on one shared pass over the store: each batch is read once, K models step on it.

Trials may share a pass when their resolved configs differ only in model, loss or optimizer knobs (not
in ``model.arch``, the token dims or ``model.layers``, which decide the tokens fed, nor in any
``train.*`` key but ``train.amp``: batch size, seed, epochs, repeat, pool size, splits and loader
workers fix the batches), when the loader runs in the trial process (``train.num_workers=0``), when
none of them has a ``last.pt`` to continue from, and when K models fit in memory together
(:func:`group_requests`).

The pass is the one training loop (:class:`train.engine.loop.TrainLoop`) with K models, set up as
``train_run`` sets up its one model (:func:`train.engine.loop.new_member`): each model gets the random
stream, the batches and the files a separate run of its config gets, so on CPU its weights, losses and
metrics are bit-identical to ``train_run``'s (tested), and an interrupted trial resumes alone with
``train_run(resume=True)``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import psutil
import torch

from shards.device import resolve_device
from shards.errors import ConfigError
from shards.store import open_store
from train.compat import config_for_store
from train.config import RunConfig
from train.engine.loop import TrainLoop, new_member
from train.engine.rundata import open_run_data
from train.engine.runlog import prepare_run_dir
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

SHARED_MODEL_SECTIONS = ("model", "loss", "optim")
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
        configs = [request_config(r) for r in requests]
        if len({data_key(c) for c in configs}) != 1:
            raise ValueError("trials of a shared pass must have the same data settings (see data_key)")
        store = requests[0].store
        _, data = open_run_data(configs[0], store, requests[0].device)
        members = []
        for request, cfg in zip(requests, configs, strict=True):
            fresh_trial_dir(Path(request.trial_dir))
            cfg = config_for_store(cfg, data.manifest, store)
            member = new_member(cfg, data, prepare_run_dir(request.trial_dir, resume=False)[0])
            data.write_run_info(member.paths, cfg, member.state.amp)
            members.append(member)
        TrainLoop(data, members, isolate_failures=True).run()
    except Exception as err:
        return [fail_trial(r, err, time.perf_counter() - start) for r in requests]
    seconds = time.perf_counter() - start
    records = []
    for request, m in zip(requests, members, strict=True):
        if m.error is None:
            try:
                metrics = result_metrics(m.best.metrics, m.best.epoch, m.state.epoch)
            except ConfigError as err:
                m.error = err
            else:
                records.append(finish_trial(request, metrics, seconds, shared=len(requests)))
                continue
        records.append(fail_trial(request, m.error, seconds))
    return records
