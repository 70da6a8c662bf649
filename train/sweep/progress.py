"""Feedback while a sweep runs: trials done / running / failed and the time left.

:class:`SweepProgress` is fed by :func:`train.sweep.runner.run_sweep` where the records arrive (in this
process, from a ``LocalCluster`` or from an external scheduler alike). Each finished trial is one log
line (logger ``train.sweep.progress``, level INFO: a batch job's stderr keeps it)::

    trial 6/16 done (lr=1e-4 seed=43): MR-full-R1@0.5 41.2 in 312 s · ok 5 · running 2 · failed 1 · ETA 21 min
    trial 7/16 failed (lr=1e-4 loss_sal=bad): ValueError: loss_sal must be a number in 0.2 s · ok 5 · ...

and, when stderr is a terminal, a tqdm bar carries the same counts (``ok 5 · running 2 · failed 1 · ETA
12 min``); the log lines are then written above it. Trials reused from an earlier run count as done from
the start (one line says how many).

The ETA assumes every task left (a trial, or a shared pass of several) takes the mean time of the tasks
finished so far in this run (before the first one, the mean of the reused trials): the running tasks
need that mean less their age, and the queued ones take the first free slot of the ``slots`` in
parallel. Tasks are assumed to start in submission order as slots free up.
"""

from __future__ import annotations

import heapq
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from shards.cliutil import TOOLKIT_LOGGERS, duration_text
from train.sweep.results import params_text
from train.sweep.trials import TrialRecord, TrialRequest

log = logging.getLogger(__name__)

_ERROR_CHARS = 120
"""Longest error text on a progress line (the whole traceback is in the trial's ``error.txt``)."""


def _took(seconds: float) -> str:
    """A trial's wall time: ``0.2 s`` below 10 s, else whole seconds (``312 s``)."""
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


class SweepProgress:
    """Counts of a running sweep, its ETA, a progress line per finished trial and an optional bar.

    Args:
        total: trials in the sweep (reused ones included).
        key_metric: the metric a ``done`` line shows.
        bar: ``True`` a tqdm bar on ``file``, ``False`` none, ``None`` one when ``file`` is a terminal.
        file: where the bar is drawn (default stderr).
        clock: seconds of a monotonic clock (the age of running tasks).
    """

    def __init__(self, total: int, key_metric: str, *, bar: bool | None = None, file: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.key_metric = key_metric
        self.clock = clock
        self.ok = self.failed = 0
        self.slots = 1
        self._task_of: dict[int, int] = {}
        self._left: dict[int, int] = {}
        self._queue: list[int] = []
        self._started: dict[int, float] = {}
        self._longest: dict[int, float] = {}
        self._durations: list[float] = []
        self._reused_seconds: list[float] = []
        self._bar = tqdm(total=total, desc="sweep", unit="trial", file=file, disable=None if bar is None
                         else not bar, bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}{postfix}",
                         dynamic_ncols=True)

    @property
    def done(self) -> int:
        """Trials finished, well or not (reused ones included)."""
        return self.ok + self.failed

    def add_reused(self, records: Sequence[TrialRecord]) -> None:
        """Count ``records`` (finished in an earlier run) as done and say how many there are."""
        self.ok += len(records)
        self._reused_seconds += [r.seconds for r in records]
        if records:
            log.info("%d of %d trials reused (finished in an earlier run)", len(records), self.total)
        self._show(len(records))

    def start(self, tasks: Sequence[Sequence[TrialRequest]], slots: int) -> None:
        """The run begins: ``tasks`` (each one trial or one shared pass) in submission order, ``slots`` of
        them at a time."""
        self.slots = max(1, slots)
        for task_id, task in enumerate(tasks):
            self._left[task_id] = len(task)
            self._task_of.update((r.index, task_id) for r in task)
        self._queue = list(range(len(tasks)))
        self._start_queued()
        trials = sum(self._left.values())
        how = f" as {len(tasks)} tasks (shared data passes)" if len(tasks) < trials else ""
        log.info("%d trials to run%s, %d at a time", trials, how, min(self.slots, len(tasks)))
        self._show(0)

    def finish(self, record: TrialRecord) -> None:
        """Count ``record`` (a trial of this run that finished or failed) and log its line."""
        if record.status == "ok":
            self.ok += 1
        else:
            self.failed += 1
        task = self._task_of[record.index]
        self._longest[task] = max(self._longest.get(task, 0.0), record.seconds)
        self._left[task] -= 1
        if self._left[task] == 0:
            self._queue.remove(task)
            self._durations.append(self._longest[task])
            self._start_queued()
        log.info("trial %d/%d %s (%s): %s · %s", self.done, self.total, "done" if record.status == "ok"
                 else "failed", params_text(record.params), self._outcome(record), self.summary())
        self._show(1)

    def running(self) -> int:
        """Trials in the tasks that hold a slot now."""
        return sum(self._left[t] for t in self._queue[:self.slots])

    def eta(self) -> float | None:
        """Seconds until every trial has finished, or ``None`` before any duration is known."""
        if not self._queue:
            return None
        durations = self._durations or self._reused_seconds
        if not durations:
            return None
        mean = statistics.fmean(durations)
        now = self.clock()
        free = sorted(max(mean - (now - self._started[t]), 0.0) for t in self._queue[:self.slots])
        for _ in self._queue[self.slots:]:
            heapq.heappush(free, heapq.heappop(free) + mean)
        return max(free)

    def summary(self) -> str:
        """``ok 5 · running 2 · failed 1 · ETA 21 min`` (no ETA while unknown or when all are done)."""
        text = f"ok {self.ok} · running {self.running()} · failed {self.failed}"
        eta = self.eta()
        return text if eta is None else f"{text} · ETA {duration_text(eta)}"

    @contextmanager
    def shown(self) -> Iterator[SweepProgress]:
        """While in the block, log lines of the toolkit go above the bar (when one is drawn); the bar is
        closed on the way out (also when interrupted)."""
        with ExitStack() as stack:
            stack.callback(self._bar.close)
            if not self._bar.disable:
                loggers = [logging.getLogger(name) for name in TOOLKIT_LOGGERS]
                stack.enter_context(logging_redirect_tqdm([lg for lg in loggers if lg.handlers]))
            yield self

    def _outcome(self, record: TrialRecord) -> str:
        took = _took(record.seconds) + (f" (shared pass of {record.shared})" if record.shared > 1 else "")
        if record.status != "ok":
            error = record.error or "unknown error"
            error = error if len(error) <= _ERROR_CHARS else error[:_ERROR_CHARS - 3] + "..."
            return f"{error} in {took}"
        value = record.metrics.get(self.key_metric)
        return f"{self.key_metric} {value:.4g} in {took}" if value is not None else f"in {took}"

    def _start_queued(self) -> None:
        now = self.clock()
        for task in self._queue[:self.slots]:
            self._started.setdefault(task, now)

    def _show(self, finished: int) -> None:
        self._bar.update(finished)
        self._bar.set_postfix_str(self.summary())
