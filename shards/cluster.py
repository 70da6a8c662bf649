"""An external dask cluster (``--scheduler ADDRESS``) for ``r2 extract`` and ``r2 sweep``: connect, wait
for a worker, check that the workers see the files, and stop the tasks of an interrupted run.

Torch-free and dask-light: ``distributed`` is imported only inside the functions that talk to a
cluster. Task functions that may run long wrap their body in :func:`interruptible`, so that
:func:`cancel_tasks` can stop them on the worker (dask itself only forgets a cancelled task and lets
its thread run on).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shards.errors import R2Error

if TYPE_CHECKING:
    from distributed import Client, Future

log = logging.getLogger(__name__)

DEFAULT_WORKER_TIMEOUT = 60.0
"""Seconds to wait for the first worker of an external cluster (``--worker-timeout``)."""
CONNECT_TIMEOUT = "30s"
"""How long to try to reach the scheduler itself."""

_RUNNING: dict[int, Any] = {}
"""Worker side: thread id -> dask key of the :func:`interruptible` tasks running in this process."""
_RUNNING_LOCK = threading.Lock()


class ClusterError(R2Error):
    """An external dask cluster that cannot do the work: unreachable, no worker, files it cannot see."""


class TaskInterrupted(BaseException):
    """Raised inside a task's thread by :func:`cancel_tasks` (a ``BaseException``: not a trial failure)."""


def check_worker_timeout(seconds: float) -> float:
    """``seconds`` when it is a positive finite number of seconds.

    Raises:
        ClusterError: zero, negative or not finite.
    """
    if not 0 < seconds < float("inf"):
        raise ClusterError(f"--worker-timeout must be a positive number of seconds, got {seconds}")
    return seconds


def connect(address: str, worker_timeout: float = DEFAULT_WORKER_TIMEOUT) -> Client:
    """A client of the scheduler at ``address`` that has at least one worker (:func:`wait_for_workers`).

    Raises:
        ClusterError: the scheduler cannot be reached in :data:`CONNECT_TIMEOUT`, or no worker joins it
            within ``worker_timeout`` seconds.
    """
    from distributed import Client

    check_worker_timeout(worker_timeout)
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as err:
        raise ClusterError(f"cannot reach the dask scheduler at {address!r} ({err})") from err
    try:
        wait_for_workers(client, address, worker_timeout)
    except BaseException:
        client.close()
        raise
    return client


def wait_for_workers(client: Client, address: str, timeout: float) -> int:
    """The number of workers of ``client``'s cluster, once there is one; says on one log line (logger
    ``shards.cluster``, warning) what it waits for when there is none yet.

    Raises:
        ClusterError: no worker joined within ``timeout`` seconds.
    """
    workers = worker_count(client)
    if workers:
        return workers
    log.warning("waiting up to %g s for a dask worker to join the scheduler at %s (--worker-timeout)",
                timeout, address)
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise ClusterError(
            f"no dask worker joined the scheduler at {address} within {timeout:g} s: start workers "
            f"(dask worker {address}) or wait longer with --worker-timeout SECONDS"
        ) from None
    return worker_count(client)


def worker_count(client: Client) -> int:
    """Workers connected to ``client``'s scheduler now."""
    return len(client.scheduler_info(n_workers=-1).get("workers", {}))


def absolute(path: str | Path) -> Path:
    """``path`` made absolute against this process's working directory (``~`` expanded, symlinks kept):
    workers of an external cluster run elsewhere, so relative paths must not be sent to them."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def missing_paths(paths: Sequence[str]) -> list[str]:
    """Those of ``paths`` that do not exist in this process (run on each worker by :func:`check_visible`)."""
    return [p for p in paths if not os.path.exists(p)]


def check_visible(client: Client, paths: Iterable[str | Path]) -> None:
    """Check on every worker of ``client``'s cluster that it sees each of ``paths`` (absolute).

    Raises:
        ClusterError: one line naming the first worker and the first path it cannot see.
    """
    names = [str(p) for p in paths]
    answers = client.run(missing_paths, names)
    for worker, missing in sorted(answers.items()):
        if missing:
            raise ClusterError(
                f"worker {worker} cannot see {missing[0]}: share the folder with the workers or run "
                "with a path they see"
            )


@contextmanager
def interruptible() -> Iterator[None]:
    """Let :func:`cancel_tasks` stop the dask task running this block (nothing outside a worker)."""
    from distributed import get_worker

    try:
        key = get_worker().get_current_task()
    except ValueError:  # not in a dask worker
        yield
        return
    ident = threading.get_ident()
    with _RUNNING_LOCK:
        _RUNNING[ident] = key
    try:
        yield
    finally:
        with _RUNNING_LOCK:
            _RUNNING.pop(ident, None)


def interrupt_keys(keys: Sequence[Any]) -> int:
    """Raise :class:`TaskInterrupted` in the threads of this process that run :func:`interruptible`
    tasks with one of ``keys`` (at their next Python instruction); returns how many were hit."""
    wanted = set(keys)
    hit = 0
    with _RUNNING_LOCK:
        for ident, key in list(_RUNNING.items()):
            if key in wanted:
                del _RUNNING[ident]
                hit += ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(ident), ctypes.py_object(TaskInterrupted)
                )
    return hit


def cancel_tasks(client: Client, futures: Iterable[Future]) -> None:
    """Cancel the unfinished ``futures`` (``force=True``: even if another client wants them) and stop those
    already running on a worker (:func:`interrupt_keys` on every worker)."""
    pending = [f for f in futures if not f.done()]
    if not pending:
        return
    client.cancel(pending, force=True)
    client.run(interrupt_keys, [f.key for f in pending], on_error="ignore")
