"""Hyper-parameter sweeps over a feature store, run on dask.distributed.

``plan_sweep`` turns a :class:`~train.sweep.spec.SweepSpec` into trial requests (one directory each, see
:mod:`train.sweep.trials`); ``run_sweep`` skips the trials an earlier run finished, groups the rest into
tasks (one trial, or K trials trained together on one shared data pass, see :mod:`train.sweep.shared`),
runs the tasks -- on a ``LocalCluster`` sized to the machine (worker processes with one thread each), on
an existing scheduler (``scheduler='tcp://host:8786'``, :mod:`shards.cluster`: wait for a worker, check
that the workers see the store and the sweep directory, stop the running trials on Ctrl-C), or in this
process (``workers=0``) -- and writes ``results.csv`` / ``results.json`` / ``sweep.png`` into the sweep
directory (also when interrupted). While it runs, :class:`~train.sweep.progress.SweepProgress` logs a line
per finished trial (counts and ETA) and draws a bar on a terminal.

A failing trial is recorded (``error.txt``, status ``failed``) and does not stop the others.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from shards.cluster import (
    DEFAULT_WORKER_TIMEOUT,
    absolute,
    cancel_tasks,
    check_visible,
    check_worker_timeout,
    connect,
    interruptible,
    worker_count,
)
from shards.device import (
    dask_worker_device,
    resolve_device,
    trial_gpus,
    usable_cores,
    use_device,
    visible_gpus,
)
from shards.errors import R2Error, option
from train.engine.runlog import write_json_atomic
from train.sweep.progress import SweepProgress
from train.sweep.results import SweepResult, write_results
from train.sweep.spec import SweepSpec, expand
from train.sweep.trials import (
    TrialFn,
    TrialRecord,
    TrialRequest,
    execute_trial,
    fail_trial,
    find_trial_dir,
    read_record,
    trial_hash,
    trial_name,
)

SPEC_FILE = "sweep.json"
SHARED_PASS_MODES = ("auto", "on", "off")
_WORKER_MEMORY_BYTES = 1.5e9
"""Memory budgeted per trial worker process (torch import ~340 MB + model, optimizer, batches)."""
_NO_DASHBOARD = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}
"""The scheduler's HTTP endpoints (health, metrics) on a free local port, no dashboard: a sweep never
collides with another cluster's port 8787."""


class SweepError(R2Error):
    """A sweep that cannot run as asked (missing store, sweep folder of another store, bad option)."""


@dataclass
class SweepPlan:
    """A sweep ready to run.

    Attributes:
        spec: the sweep description.
        preset: the config preset of every trial (``spec.preset``, checked).
        store: feature store path (``spec.store``, checked, made absolute: workers may run elsewhere).
        out_dir: sweep directory.
        requests: one request per trial, in expansion order.
        key_metric: metric that ranks the trials.
        higher_is_better: direction of ``key_metric``.
        arch: backbone of the store (``model.arch``), when known.
    """

    spec: SweepSpec
    preset: str
    store: str
    out_dir: Path
    requests: list[TrialRequest]
    key_metric: str
    higher_is_better: bool
    arch: str | None = None


def plan_sweep(
    spec: SweepSpec,
    out_dir: str | Path | None = None,
    *,
    device: str = "cpu",
    key_metric: str | None = None,
    higher_is_better: bool = True,
) -> SweepPlan:
    """Expand ``spec`` into trial requests under ``out_dir`` (default :func:`default_out`).

    ``key_metric=None`` (the real trainer) fixes ``train.num_workers=0`` unless ``spec.fixed`` sets it,
    checks every trial's overrides and the store (a bad key fails here, before anything runs) and takes
    the preset's key metric; a given ``key_metric`` skips all that (custom trial functions).
    """
    preset, store = spec.preset, spec.store
    if not preset:
        raise SweepError("no preset: give --preset NAME (or 'preset' in the spec file)")
    if not store:
        raise SweepError("no feature store: give --store PATH (or 'store' in the spec file)")
    if not Path(store).exists():
        raise SweepError(
            f"feature store {store}: not found; extract one ({option('r2 extract', 'make extract')}) or fix "
            f"{option('--store', 'STORE=')}"
        )
    store = str(absolute(store))
    if key_metric is None:
        from train.sweep.config import with_loader_default

        spec = replace(spec, fixed=with_loader_default(spec.fixed))
    out_dir = (default_out(preset) if out_dir is None else Path(out_dir)).resolve()
    requests = []
    arch = None
    for index, params in enumerate(expand(spec)):
        overrides = {**spec.fixed, **params}
        digest = trial_hash(preset, overrides)
        name = trial_name(index, params, digest)
        requests.append(TrialRequest(index, name, str(out_dir / name), preset, store,
                                     overrides, params, device=device))
    if key_metric is None:
        from train.sweep.config import check_sweep

        trials = [r.override_list() for r in requests]
        key_metric, higher_is_better, arch = check_sweep(preset, store, trials)
    return SweepPlan(spec, preset, store, out_dir, requests, key_metric, higher_is_better, arch)


def default_out(preset: str) -> Path:
    """The sweep folder when none is given: ``runs/<preset>-sweep``, beside ``r2 train``'s ``runs/<preset>``
    (and ``make sweep``'s ``runs/<DATASET>-sweep``, whose preset is the dataset's)."""
    return Path("runs", f"{preset}-sweep")


def default_workers(n_tasks: int, device: str = "cpu") -> int:
    """LocalCluster worker processes: one per GPU the trials use (:func:`shards.device.trial_gpus`: one
    for ``cuda:N``, every visible GPU for ``cuda`` / ``auto``), else one per core; at most one per task
    and within available memory."""
    import psutil

    by_memory = int(psutil.virtual_memory().available // _WORKER_MEMORY_BYTES)
    gpus = len(trial_gpus(device, visible_gpus())) if device != "cpu" else 0
    return max(1, min(gpus or usable_cores(), n_tasks, by_memory))


def _record_spec(plan: SweepPlan) -> None:
    """Write ``sweep.json``; refuse a sweep directory that was made for another store."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    path = plan.out_dir / SPEC_FILE
    store = os.path.realpath(plan.store)
    if path.is_file():
        earlier = json.loads(path.read_text(encoding="utf-8")).get("store_realpath")
        if earlier and earlier != store:
            raise SweepError(f"sweep folder {plan.out_dir} holds trials on store {earlier}; "
                             f"use another --out for store {store}")
    spec = asdict(plan.spec)
    spec.update(store_realpath=store, key_metric=plan.key_metric, higher_is_better=plan.higher_is_better,
                trials=[{"index": r.index, "name": r.name, "params": r.params} for r in plan.requests])
    write_json_atomic(path, spec)


def _resolve_existing(plan: SweepPlan) -> tuple[list[TrialRecord], list[TrialRequest]]:
    """Split the plan into finished records (reused) and requests to run (in their old folder if any)."""
    finished, pending = [], []
    for request in plan.requests:
        existing = find_trial_dir(plan.out_dir, request.name.rsplit("-", 1)[1])
        if existing is not None:
            request = replace(request, name=existing.name, trial_dir=str(existing))
        record = read_record(request)
        if record.status == "ok":
            record.reused = True
            finished.append(record)
        else:
            pending.append(request)
    return finished, pending


def run_task(requests: list[TrialRequest], trial_fn: TrialFn | None) -> list[TrialRecord]:
    """Run one task on a worker: a single trial, or several trials in one shared data pass, on this
    worker's device (made the current CUDA device, :func:`shards.device.use_device`)."""
    device = str(use_device(dask_worker_device(requests[0].device)))
    requests = [replace(r, device=device) for r in requests]
    if len(requests) > 1:
        from train.sweep.shared import run_shared_trials

        return run_shared_trials(requests)
    if trial_fn is None:
        from train.sweep.config import train_trial

        trial_fn = train_trial
    return [execute_trial(trial_fn, requests[0])]


def run_task_on_worker(requests: list[TrialRequest], trial_fn: TrialFn | None) -> list[TrialRecord]:
    """:func:`run_task` on a dask worker, stoppable by :func:`shards.cluster.cancel_tasks` (the trials
    then stay pending)."""
    with interruptible():
        return run_task(requests, trial_fn)


def _failed_task(requests: list[TrialRequest], err: BaseException) -> list[TrialRecord]:
    """Records for a task whose worker raised outside the trial bookkeeping (e.g. the worker died)."""
    return [fail_trial(r, err, 0.0) for r in requests]


def _submit_all(client, tasks: list[list[TrialRequest]], trial_fn: TrialFn | None,
                on_record: Callable[[TrialRecord], None]) -> None:
    """Submit every task to ``client`` and pass their records on as they complete; on the way out (Ctrl-C)
    cancel the tasks left and stop those running on the workers."""
    from distributed import as_completed

    futures = {}
    try:
        for task in tasks:
            future = client.submit(run_task_on_worker, task, trial_fn, key=f"r2-sweep-{task[0].name}",
                                   pure=False)
            futures[future] = task
        for future in as_completed(futures):
            try:
                records = future.result()
            except Exception as err:
                records = _failed_task(futures[future], err)
            for record in records:
                on_record(record)
    finally:
        cancel_tasks(client, futures)


def _run_tasks(
    pending: list[TrialRequest],
    trial_fn: TrialFn | None,
    shared_pass: str,
    on_record: Callable[[TrialRecord], None],
    progress: SweepProgress,
    *,
    workers: int | None,
    scheduler: str | None,
    threads: int | None,
    worker_timeout: float,
) -> None:
    """Group ``pending`` into tasks for the available slots and run them where asked (``progress`` learns
    the tasks and the slots as they start)."""
    if scheduler:
        with connect(scheduler, worker_timeout) as client:
            check_visible(client, [pending[0].store, Path(pending[0].trial_dir).parent])
            check_device(pending[0].device, client)
            slots = max(1, worker_count(client))
            tasks = _make_tasks(pending, trial_fn, shared_pass, slots, _worker_budget(client))
            tasks = _with_threads(tasks, threads or 1)
            progress.start(tasks, slots)
            _submit_all(client, tasks, trial_fn, on_record)
        return
    if workers == 0:
        tasks = _with_threads(_make_tasks(pending, trial_fn, shared_pass, 1), threads)
        progress.start(tasks, 1)
        for task in tasks:
            for record in run_task(task, trial_fn):
                on_record(record)
        return
    import dask
    import psutil
    from distributed import Client, LocalCluster

    slots = workers or default_workers(len(pending), pending[0].device)
    tasks = _make_tasks(pending, trial_fn, shared_pass, slots)
    n_workers = min(slots, len(tasks))
    tasks = _with_threads(tasks, threads or max(1, usable_cores() // n_workers))
    with _stop_signals_ignored_in_children(), dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
            memory_limit=int(psutil.virtual_memory().total // n_workers), silence_logs=logging.ERROR,
            scheduler_kwargs=_NO_DASHBOARD,
        )
    with cluster, Client(cluster) as client:
        progress.start(tasks, n_workers)
        _submit_all(client, tasks, trial_fn, on_record)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Ctrl-C, and what batch schedulers send on pre-emption: both stop a sweep, in this process only."""


@contextmanager
def _stop_signals_ignored_in_children() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM while worker processes start, so that they inherit the ignored disposition.

    Ctrl-C (sent to the terminal's whole process group) and SIGTERM (which batch schedulers send to every
    process of a job) then stop only this process, which closes the cluster (and its workers) in order,
    instead of every worker dying with its own traceback. Either signal is lost while the workers start.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = [signal.signal(signum, signal.SIG_IGN) for signum in _STOP_SIGNALS]
    try:
        yield
    finally:
        for signum, handler in zip(_STOP_SIGNALS, previous, strict=True):
            signal.signal(signum, handler)


def run_sweep(
    plan: SweepPlan,
    *,
    trial_fn: TrialFn | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    shared_pass: str = "auto",
    threads: int | None = None,
    worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
    on_record: Callable[[TrialRecord], None] | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run every unfinished trial of ``plan`` and write the results.

    Args:
        plan: from :func:`plan_sweep`.
        trial_fn: runs one trial and returns its metrics (default: the real trainer,
            ``train.sweep.config.train_trial``). A custom function disables shared passes.
        workers: LocalCluster worker processes (``None``: :func:`default_workers`; ``0``: run here).
        scheduler: address of an existing dask scheduler (then ``workers`` is ignored).
        shared_pass: ``auto`` (group compatible trials when it pays), ``on`` (group all compatible
            trials), ``off``.
        threads: torch intra-op threads per trial (default: cores // workers on a LocalCluster, 1 on
            an external cluster, torch's default in this process); each trial records its count.
        worker_timeout: seconds to wait for the first worker of an external cluster.
        on_record: called in this process with each record as it completes (also for reused trials).
        progress: draw a bar of the trials on stderr when it is a terminal. A line per finished trial is
            logged either way (:class:`~train.sweep.progress.SweepProgress`, level INFO).

    Returns:
        The records of all trials of the plan in plan order. ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM
        inside :func:`shards.cliutil.sigterm_as_interrupt`) is re-raised after the running trials were
        stopped and the results of the finished ones written.

    Raises:
        SweepError: a bad option. ConfigError: a device that does not exist here (or on the workers of
            an external cluster), e.g. ``cuda`` without CUDA; checked before any trial runs.
        ClusterError: an external cluster without a worker, or whose workers do not see the store or
            the sweep directory.
    """
    if shared_pass not in SHARED_PASS_MODES:
        raise SweepError(f"--shared-pass {shared_pass!r}: use one of {', '.join(SHARED_PASS_MODES)}")
    if workers is not None and workers < 0:
        raise SweepError(f"--workers {workers}: must be >= 0 (0 runs the trials in this process)")
    if threads is not None and threads < 1:
        raise SweepError(f"--threads {threads}: must be >= 1")
    check_worker_timeout(worker_timeout)
    if plan.requests and not scheduler:
        check_device(plan.requests[0].device)
    _record_spec(plan)
    finished, pending = _resolve_existing(plan)
    records = {r.index: r for r in finished}
    for request in pending:
        records[request.index] = TrialRecord(request.index, request.name, request.params, "pending")

    tracker = SweepProgress(len(plan.requests), plan.key_metric, bar=None if progress else False)

    def accept(record: TrialRecord) -> None:
        records[record.index] = record
        tracker.finish(record)
        if on_record is not None:
            on_record(record)

    try:
        with tracker.shown():
            tracker.add_reused(finished)
            for record in finished:
                if on_record is not None:
                    on_record(record)
            if pending:
                _run_tasks(pending, trial_fn, shared_pass, accept, tracker, workers=workers,
                           scheduler=scheduler, threads=threads, worker_timeout=worker_timeout)
    finally:
        for request in pending:     # interrupted: a worker may have finished a trial not reported yet
            if records[request.index].status == "pending":
                records[request.index] = read_record(request)
        result = SweepResult(plan, [records[r.index] for r in plan.requests])
        write_results(result)
    return result


def _with_threads(tasks: list[list[TrialRequest]], threads: int | None) -> list[list[TrialRequest]]:
    return [[replace(r, threads=threads) for r in task] for task in tasks]


def _make_tasks(pending: list[TrialRequest], trial_fn: TrialFn | None, shared_pass: str,
                slots: int, budget: Callable[[str, int], int] | None = None) -> list[list[TrialRequest]]:
    """Single-trial tasks, or shared-pass groups of compatible trials (real trainer only) within
    ``budget(device, workers)`` bytes per pass (default: this machine's,
    :func:`train.sweep.shared.memory_budget`)."""
    if shared_pass == "off" or trial_fn is not None or len(pending) < 2:
        return [[r] for r in pending]
    from train.sweep.shared import group_requests, memory_budget

    return group_requests(pending, slots=slots, mode=shared_pass, budget=budget or memory_budget)


def _worker_budget(client) -> Callable[[str, int], int]:
    """The memory budget of one shared pass as a worker of an external cluster sees it (its own GPU
    or host, one worker per GPU as the cluster docs set it up)."""
    from train.sweep.shared import memory_budget

    def budget(device: str, workers: int) -> int:
        return client.submit(memory_budget, device, 1, pure=False).result()

    return budget


def check_device(device: str, client=None) -> None:
    """Fail once, before any trial runs, when the trials' ``device`` does not exist (``cuda`` without
    CUDA, ``cuda:N`` beyond the visible GPUs): here, or on a worker of ``client`` (an external cluster).

    Raises:
        ConfigError: from :func:`shards.device.resolve_device`, naming the device and what to use.
    """
    if device in ("cpu", "auto"):
        return
    if client is None:
        resolve_device(device)
    else:
        client.submit(resolve_device, device, pure=False).result()
