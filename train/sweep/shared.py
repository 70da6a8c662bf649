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
from collections.abc import Callable
from pathlib import Path

import torch

from shards.device import gpu_sharers, resolve_device, trial_gpus, use_device, visible_gpus
from shards.errors import ConfigError
from shards.store import open_store
from train.compat import config_for_store
from train.config import RunConfig
from train.engine.loop import TrainLoop, new_member
from train.engine.memory import ACTIVATIONS, BATCH, STATE, StepMemory, estimate_step, free_bytes, store_extent
from train.engine.rundata import open_run_data
from train.engine.runlog import prepare_run_dir
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
"""Share of a worker's free memory (its share of a GPU, or of the host) that one shared pass may take."""


def data_key(cfg: RunConfig) -> str:
    """Everything of ``cfg`` that decides the batches; trials with equal keys can share a pass."""
    data = cfg.to_dict()
    model = {k: data["model"][k] for k in DATA_MODEL_KEYS}
    for section in SHARED_MODEL_SECTIONS:
        data.pop(section)
    data["model"] = model
    data["train"].pop("amp")
    return json.dumps(data, sort_keys=True)


def pass_bytes(step: StepMemory, models: int) -> int:
    """Memory of a shared pass of ``models`` models whose single step is ``step`` (bytes): the batch
    once, one model's activations (the models step one after the other, each backward frees its
    activations) and every model's weights, gradients and AdamW moments."""
    return step.bytes_of(BATCH) + step.bytes_of(ACTIVATIONS) + models * step.bytes_of(STATE)


def max_models(step: StepMemory, budget: int) -> int:
    """Most models of one step ``step`` whose shared pass fits ``budget`` bytes (at least 1)."""
    room = budget - step.bytes_of(BATCH) - step.bytes_of(ACTIVATIONS)
    return max(1, room // max(step.bytes_of(STATE), 1))


def memory_budget(device: str, workers: int) -> int:
    """Bytes one shared pass may use: :data:`MEMORY_FRACTION` of the free memory of the least free GPU
    the trials spread over, divided among the workers that share that GPU
    (:func:`shards.device.gpu_sharers`); for CPU trials, of the available host memory divided among
    ``workers`` worker processes."""
    target = resolve_device(device)
    gpus = trial_gpus(device, visible_gpus()) if target.type == "cuda" else []
    if gpus:
        free = min(free_bytes(torch.device("cuda", g)) for g in gpus)
        return int(MEMORY_FRACTION * free / gpu_sharers(workers, len(gpus)))
    return int(MEMORY_FRACTION * free_bytes(target) / max(workers, 1))


def _pass_size(configs: list[RunConfig], request: TrialRequest, budget: int) -> int:
    """Most models of ``configs`` (trials of one data key) one shared pass holds within ``budget``."""
    clips, tokens = store_extent(open_store(request.store))
    device = request.device     # cuda[:N] is taken as asked: an external cluster's GPUs are not here
    device_type = "cuda" if device.startswith("cuda") else resolve_device(device).type
    steps = [estimate_step(cfg, clips, tokens, device_type=device_type) for cfg in configs]
    return min(max_models(step, budget) for step in steps)


def _split_even(items: list, parts: int) -> list[list]:
    """``items`` in ``parts`` contiguous chunks whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        stop = start + size + (i < extra)
        chunks.append(items[start:stop])
        start = stop
    return chunks


def group_requests(
    pending: list[TrialRequest],
    *,
    slots: int,
    mode: str,
    budget: Callable[[str, int], int] = memory_budget,
) -> list[list[TrialRequest]]:
    """Tasks for ``pending`` trials: shared-pass groups of compatible trials, else single trials.

    ``mode='on'`` makes each set of compatible trials as few groups as memory allows. ``mode='auto'``
    shares only when there are more compatible trials than ``slots`` (workers that would otherwise
    run them side by side): it splits them into ``slots`` groups (more if memory demands), so every
    worker stays busy and each batch is read once per worker instead of once per trial. With one slot
    (one GPU) all compatible trials share one pass. Memory: :func:`pass_bytes` of a group stays within
    ``budget(device, slots)`` bytes (default :func:`memory_budget`, asked only when a set is shared).
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
        room = budget(members[0].device, slots)
        fit = _pass_size([configs[r.index] for r in members], members[0], room)
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
        device = str(use_device(requests[0].device))
        configs = [request_config(r) for r in requests]
        if len({data_key(c) for c in configs}) != 1:
            raise ValueError("trials of a shared pass must have the same data settings (see data_key)")
        store = requests[0].store
        _, data = open_run_data(configs[0], store, device)
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
