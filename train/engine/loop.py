"""The one training loop: K ≥ 1 models stepped on one pass over the data, validated and recorded.

``r2 train`` runs it with one model (:func:`train.engine.trainer.train_run`), a sweep's shared pass
with K models whose configs make the same batches (:mod:`train.sweep.shared`). Each epoch::

    for batch in epoch_inputs(...):          # read and moved to the device once
        for model in models: step(model)     # each with its own global-generator states
    validate every model on one read of the validation split
    record each model: metrics.jsonl, best.pt / best.json / val_preds.jsonl on a new best, last.pt,
        its line in train.log (and on the console with ``progress``), its TensorBoard scalars

Every model owns the states of the global generators (python, numpy, torch) that its steps draw from
(dropout, drop-path): they are restored before and captured after each of its steps, so a model sees
the random stream a run of its config alone would see (on CPU its weights, losses and metrics are
bit-identical), and its ``last.pt`` holds its own states, so an interrupted run resumes alone.

Steps never wait on the host (on CUDA): a model's per-step values (losses, gradient norm, skipped flag)
stay on the device until it reads them, every ``train.log_every`` steps and at the end of the epoch, in
one transfer (:meth:`Member.flush`); the epoch's statistics, the progress bar and the non-finite check
see them then.

With ``isolate_failures`` (the sweep), a model whose step, validation or files fail is set aside with
its error and the others go on; otherwise (``r2 train``) the error propagates at once. A model whose
steps are non-finite :data:`NONFINITE_STEPS` times in a row fails with :class:`NonFiniteLossError`.

What a run tells: ``train.log`` in each run folder gets a start line (the run's settings and command),
one line per epoch (:func:`train.engine.records.epoch_line`: losses, key metric, best so far, time,
ETA) and an end line (done, failed, or stopped); with ``progress`` (``r2 train``) the start and epoch
lines are logged to the console too. Each model's TensorBoard scalars go to ``<run>/tensorboard``
(:class:`train.engine.runlog.TensorBoardLog`): the epoch's mean losses, lr, samples/s and validation
metrics, and the mean losses of every ``train.log_every`` steps, all at the optimizer step.

A ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM made one by :func:`shards.cliutil.sigterm_as_interrupt`)
stops the loop where it is: the files stay those of the last finished epoch, ``run.json`` gets the
``interrupted`` record (:func:`train.engine.records.record_interrupt`), ``train.log`` a line, and the
interrupt propagates.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from shards.cliutil import Terminated
from shards.datasets import get_dataset
from shards.errors import R2Error
from train.config import RunConfig
from train.data.batching import ModelInputs
from train.engine.evaluate import predict_batch, score_predictions
from train.engine.records import (
    Best,
    EpochStats,
    command_line,
    duration_text,
    end_epoch,
    epoch_line,
    log_event,
    record_interrupt,
    record_run_end,
    record_validation,
    validation_due,
)
from train.engine.rng import capture_rng, restore_rng, seed_everything
from train.engine.rundata import RunData, epoch_inputs
from train.engine.runlog import RunPaths, TensorBoardLog
from train.engine.step import StepValues, TrainState, build_state, read_step_values, train_step

log = logging.getLogger(__name__)

NONFINITE_STEPS = 5
"""Consecutive non-finite steps after which a model stops: steps whose loss is NaN or Inf, or, without
a GradScaler, whose gradient norm is (the step is then skipped). AMP's skipped steps with a finite loss
(the scaler backing off after an fp16 overflow) do not count, and a finite step resets the count."""


class NonFiniteLossError(R2Error):
    """A model's loss stayed non-finite for :data:`NONFINITE_STEPS` consecutive steps."""


@dataclass
class PendingStep:
    """A step whose values are still on the device.

    Attributes:
        values: the :func:`train.engine.step.train_step` result.
        size: queries of its batch.
        iteration: optimizer steps taken after it. epoch: its 0-based epoch.
    """

    values: StepValues
    size: int
    iteration: int
    epoch: int


@dataclass
class Member:
    """One model of the loop with the bookkeeping of its run directory.

    Attributes:
        state: model, optimizer, schedule and counters.
        paths: its run directory.
        best: its best validated epoch so far (ranked by the dataset's key metric).
        rng: its states of the global generators (:func:`train.engine.rng.capture_rng`).
        stats: running totals of the current epoch's steps (of those read so far).
        error: why it was set aside (``isolate_failures`` only), else ``None``.
        nonfinite: consecutive non-finite steps so far (see :data:`NONFINITE_STEPS`).
        log_every: steps between two reads of the step values from the device (``train.log_every``).
        pending: the steps not read yet.
        board: its TensorBoard scalars (set by :meth:`TrainLoop.run`; ``None``: none written).
        saved: epochs its ``last.pt`` holds (where a resume continues).
    """

    state: TrainState
    paths: RunPaths
    best: Best
    rng: dict[str, Any]
    stats: EpochStats = field(default_factory=lambda: EpochStats(lr=0.0))
    error: BaseException | None = None
    nonfinite: int = 0
    log_every: int = 1
    pending: list[PendingStep] = field(default_factory=list)
    board: TensorBoardLog | None = None
    saved: int = 0

    def step(self, inputs: ModelInputs, size: int) -> None:
        """One optimizer step on ``inputs`` (``size`` queries) with this model's generator states. Its
        values stay on the device until :attr:`log_every` steps are pending; then :meth:`flush` reads them.

        Raises:
            NonFiniteLossError: from :meth:`flush`.
        """
        device = self.state.device
        restore_rng(self.rng, device)
        try:
            values = train_step(self.state, inputs)
        finally:
            self.rng = capture_rng(device)
        self.pending.append(PendingStep(values, size, self.state.iteration, self.state.epoch))
        if len(self.pending) >= self.log_every:
            self.flush()

    def flush(self) -> None:
        """Read the values of the pending steps from the device (one transfer: the host waits for them
        here) and count them, in order, into :attr:`stats` and the non-finite streak.

        A streak is thus detected at the read after its :data:`NONFINITE_STEPS`-th step, counting the
        same consecutive steps as a check after every step; the steps taken meanwhile were skipped too
        (a non-finite loss has non-finite gradients), so the weights stay those before the streak.

        Raises:
            NonFiniteLossError: the :data:`NONFINITE_STEPS`-th non-finite step in a row (the message names
                its loss, gradient norm, iteration and epoch).
        """
        pending, self.pending = self.pending, []
        if not pending:
            return
        outs = read_step_values([p.values for p in pending])
        if self.board is not None:
            means = {k: sum(o[k] for o in outs) / len(outs) for k in outs[0] if k != "skipped"}
            self.board.scalars("step", means, pending[-1].iteration)
        for step, out in zip(pending, outs, strict=True):
            self.stats.add(out, step.size)
            bad = not math.isfinite(out["loss"]) or (bool(out["skipped"]) and not self.state.amp)
            self.nonfinite = self.nonfinite + 1 if bad else 0
            if self.nonfinite >= NONFINITE_STEPS:
                raise NonFiniteLossError(
                    f"run {self.paths.root}: {self.nonfinite} training steps in a row had a non-finite loss "
                    f"or gradient (the last: loss {out['loss']:g}, gradient norm {out['grad_norm']:g}, "
                    f"iteration {step.iteration}, epoch {step.epoch + 1}), so none updated the weights; "
                    "check the store for non-finite tokens (`r2 shards verify STORE`) or lower the learning "
                    "rate (lr)"
                )


def new_member(cfg: RunConfig, data: RunData, paths: RunPaths) -> Member:
    """A fresh model of ``cfg`` on ``data.device`` writing to ``paths``: global generators seeded with
    ``train.seed``, the model built (its initial weights depend on the seed only), the states taken."""
    seed_everything(cfg.train.seed)
    state = build_state(cfg, data.device)
    best = Best(get_dataset(cfg.dataset).key_metric)
    return Member(state, paths, best, capture_rng(data.device), log_every=cfg.train.log_every)


class TrainLoop:
    """Train ``members`` on ``data`` from their current epoch to ``train.epochs``.

    Args:
        data: what the models read (their configs agree on every key that decides the batches).
        members: the models, all at the same epoch (0 for a fresh run, the resumed one otherwise).
        isolate_failures: set a failing model aside and go on with the others (else raise).
        progress: tqdm bars on stderr for the epoch and the validation.
    """

    def __init__(
        self, data: RunData, members: list[Member], isolate_failures: bool = False, progress: bool = False
    ) -> None:
        if len({m.state.epoch for m in members}) != 1:
            raise ValueError("the models of one loop must be at the same epoch")
        self.data = data
        self.members = members
        self.cfg = members[0].state.cfg
        self.isolate_failures = isolate_failures
        self.progress = progress

    @property
    def alive(self) -> list[Member]:
        """The models not set aside."""
        return [m for m in self.members if m.error is None]

    @contextmanager
    def _guard(self, member: Member) -> Iterator[None]:
        """Record an error of ``member`` and continue (``isolate_failures``), else let it propagate."""
        try:
            yield
        except Exception as err:
            if not self.isolate_failures:
                raise
            member.error = err
            with contextlib.suppress(OSError):  # the error itself may be a full disk
                log_event(member.paths, f"failed at {self._where(member)}: {err}")

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="q", disable=not self.progress, leave=False)

    def _train_epoch(self, epoch: int) -> float:
        """Epoch ``epoch`` (0-based) of every model, its step values read at the end; returns its wall
        time in seconds."""
        for m in self.alive:
            m.stats = EpochStats(lr=m.state.schedule.lr_at(m.state.epoch, m.state.iteration))
        data, cfg = self.data, self.cfg
        total = data.loader.num_queries * cfg.train.repeat
        start = time.perf_counter()
        with self._bar(total, f"epoch {epoch + 1}/{cfg.train.epochs}") as bar:
            shown = 0
            for inputs, size in epoch_inputs(data.loader, cfg, data.spec, data.device, epoch):
                for m in self.alive:
                    with self._guard(m):
                        m.step(inputs, size)
                bar.update(size)
                read = sum(m.stats.steps for m in self.alive)
                if read != shown:
                    shown = read
                    self._postfix(bar, start)
            for m in self.alive:
                with self._guard(m):
                    m.flush()
            self._postfix(bar, start)
        return time.perf_counter() - start

    def _postfix(self, bar: tqdm, start: float) -> None:
        """Show the epoch's mean loss so far (read steps, averaged over the models) and the query rate."""
        losses = [m.stats.mean("loss") for m in self.alive if m.stats.steps]
        if losses:
            rate = bar.n / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", sps=f"{rate:.1f}")

    def _validate(self, records: dict[int, dict[str, Any]]) -> None:
        """One read of the validation split: every model predicts each batch, then ranks its predictions
        (a new best writes its best files)."""
        data = self.data
        if data.val_loader is None or data.val_split is None:
            return
        predictions: dict[int, list] = {id(m): [] for m in self.alive}
        start = time.perf_counter()
        with self._bar(data.val_loader.num_queries, "validate") as bar:
            for batch in data.val_loader:
                for m in self.alive:
                    with self._guard(m):
                        model, cfg = m.state.model, m.state.cfg
                        predictions[id(m)] += predict_batch(model, batch, data.spec, cfg, data.device)
                bar.update(len(batch))
        seconds = time.perf_counter() - start
        queries = data.val_loader.dataset.queries
        for m in self.alive:
            with self._guard(m):
                validation = score_predictions(data.spec.name, predictions[id(m)], queries, seconds)
                records[id(m)].update(
                    record_validation(m.state, validation, m.best, m.paths, data.identity, data.val_split),
                    val_missing=data.val_missing,
                )

    def _epoch_in_progress(self, member: Member) -> int:
        """The 1-based epoch ``member`` is in: the one after its saved epochs (the last when all are)."""
        return min(member.saved + 1, self.cfg.train.epochs)

    def _where(self, member: Member) -> str:
        """``epoch 4/30, step 123``: the epoch ``member`` is in and its optimizer steps so far."""
        epoch = self._epoch_in_progress(member)
        return f"epoch {epoch}/{self.cfg.train.epochs}, step {member.state.iteration}"

    def _summary(self, member: Member) -> str:
        """The settings of ``member``'s run in one line (start of ``train.log`` and of the console)."""
        cfg, data = member.state.cfg, self.data
        val = f"validation on {data.val_split}" if data.val_loader is not None else "no validation"
        steps, epochs = data.steps_per_epoch(cfg), cfg.train.epochs
        return (
            f"preset {cfg.preset} (dataset {cfg.dataset}{'/' + cfg.domain if cfg.domain else ''}), "
            f"store {data.store_path} ({data.manifest.pretrained} weights), "
            f"{data.loader.num_queries} {data.train_split} queries, "
            f"{epochs} epoch{'s' * (epochs != 1)} x {steps} step{'s' * (steps != 1)}, "
            f"batch {cfg.train.batch_size}, "
            f"lr {cfg.optim.lr:g}, seed {cfg.train.seed}, {val}, device {data.device}"
        )

    def _start(self, member: Member) -> None:
        """Open ``member``'s TensorBoard log (a resumed run's continues after its saved epochs) and write
        its start line."""
        state = member.state
        member.saved = state.epoch
        member.board = TensorBoardLog(member.paths.tensorboard, state.iteration + 1 if state.epoch else None)
        epochs = self.cfg.train.epochs
        resumed = f" at epoch {state.epoch + 1}/{epochs}" if state.epoch else ""
        summary = self._summary(member)
        what = "resume" if state.epoch else "start"
        log_event(member.paths, f"{what}{resumed}: {summary}; command: {command_line()}")
        if self.progress:
            what = "resuming" if state.epoch else "training"
            log.info("%s %s%s: %s", what, member.paths.root, resumed, summary)
            log.info("logs: %s, tensorboard --logdir %s", member.paths.train_log, member.paths.tensorboard)

    def _report(self, member: Member, record: dict[str, Any], seconds: float, eta: float | None) -> None:
        """The epoch's line (``train.log``, the console with ``progress``) and TensorBoard scalars."""
        line = epoch_line(record, member.best, self.cfg.train.epochs, seconds, eta)
        log_event(member.paths, line)
        if self.progress:
            log.info(line)
        if member.board is not None:
            step = member.state.iteration
            member.board.scalars("train", {**record["train"], "lr": record["lr"]}, step)
            member.board.scalars("val", record.get("val") or {}, step)
            times = {"epoch_seconds": seconds, "samples_per_s": record["samples_per_s"]}
            member.board.scalars("time", times, step)

    def _stopped(self, err: KeyboardInterrupt) -> None:
        """Record in each model's ``run.json`` and ``train.log`` where and why the run stopped."""
        reason = "SIGTERM" if isinstance(err, Terminated) else "SIGINT"
        for m in self.alive:
            saved = f"last.pt holds epoch {m.saved}" if m.saved else "no epoch done"
            with contextlib.suppress(OSError):  # a full disk must not hide the stop
                record_interrupt(m.paths, reason, self._epoch_in_progress(m), m.state.iteration, m.saved)
                log_event(m.paths, f"stopped by {reason} at {self._where(m)}; {saved}; resume with --resume")

    def run(self) -> None:
        """Train every model up to ``train.epochs`` epochs, validating every ``train.val_every`` epochs and
        after the last, record each epoch (``metrics.jsonl``, ``last.pt``, ``train.log``, TensorBoard), and
        the end of each model's run (``run.json``, ``train.log``); see the module docstring for a stop.

        Raises:
            KeyboardInterrupt: Ctrl-C or SIGTERM (recorded first).
            Exception: an error of the pass, or of a model without ``isolate_failures`` (written to
                ``train.log`` first).
        """
        cfg = self.cfg
        times: list[float] = []
        try:
            for m in self.members:
                with self._guard(m):
                    self._start(m)
            for epoch in range(self.members[0].state.epoch, cfg.train.epochs):
                start = time.perf_counter()
                seconds = self._train_epoch(epoch)
                records: dict[int, dict[str, Any]] = {}
                for m in self.alive:
                    m.state.epoch += 1
                    records[id(m)] = {"epoch": m.state.epoch, **m.stats.record(seconds)}
                    records[id(m)]["iteration"] = m.state.iteration
                if validation_due(epoch + 1, cfg.train.val_every, cfg.train.epochs):
                    self._validate(records)
                for m in self.alive:
                    with self._guard(m):
                        end_epoch(m.state, records[id(m)], m.best, m.paths, self.data.identity, m.rng)
                        m.saved = m.state.epoch
                times.append(time.perf_counter() - start)
                left = cfg.train.epochs - epoch - 1
                eta = sum(times) / len(times) * left if left else None
                for m in self.alive:
                    with self._guard(m):
                        self._report(m, records[id(m)], times[-1], eta)
                if not self.alive:
                    return
            for m in self.alive:
                with self._guard(m):
                    record_run_end(m.paths)
                    log_event(m.paths, self._end_line(m, sum(times)))
        except KeyboardInterrupt as err:
            self._stopped(err)
            raise
        except Exception as err:
            for m in self.alive:
                with contextlib.suppress(OSError):
                    log_event(m.paths, f"failed at {self._where(m)}: {err}")
            raise
        finally:
            for m in self.members:
                if m.board is not None:
                    m.board.close()

    def _end_line(self, member: Member, seconds: float) -> str:
        """``train.log``'s last line of a finished run: epochs, this process's time, the best epoch."""
        best = member.best
        found = "no validation"
        if best.value is not None:
            found = f"best {best.metric} {best.value:.2f} at epoch {best.epoch}"
        return f"end: {member.state.epoch} epochs done ({duration_text(seconds)} in this process); {found}"
