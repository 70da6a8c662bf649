"""What a run directory records for one model, epoch by epoch.

- :class:`EpochStats`: the epoch's optimizer steps -> its metrics-log fields (mean losses, lr, steps,
  skipped steps, samples, samples/s).
- :class:`Best` and :func:`record_validation`: rank a validation by the key metric and track the best
  value of every metric with its epoch (as nncore's EvalHook does; higher is better, :func:`improves`);
  a new key-metric best writes ``best.pt`` and ``val_preds.jsonl``, every validation ``best.json``.
- :func:`end_epoch`: append the epoch's record to ``metrics.jsonl``, write ``epoch_{N:03d}.pt``
  (``train.save_every_epoch``) and ``last.pt``.
- :func:`run_provenance` / :func:`record_run_end` / :func:`record_interrupt`: what ``run.json`` says
  about the process that ran (command line, package version, git revision, start, resume and end
  times, UTC; where and why a stopped run stopped).
- :func:`epoch_line` and :func:`log_event`: the one line an epoch gets on the console and in
  ``train.log`` (losses, key metric, best so far, time, ETA).

The training loop (:mod:`train.engine.loop`) records every model through these functions, so a trial
of a sweep's shared pass leaves the files a separate run leaves.
"""

from __future__ import annotations

import importlib.metadata
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.predictions import write_predictions
from shards.cliutil import duration_text
from shards.errors import ConfigError
from train.checkpoint import save_checkpoint
from train.engine.evaluate import Validation
from train.engine.runlog import (
    RunPaths,
    append_log,
    append_metrics,
    read_json,
    utc_now,
    write_json_atomic,
)
from train.engine.step import TrainState, state_meta

_STEP_INFO = ("lr", "skipped", "grad_norm")
"""Keys of a :func:`train.engine.step.train_step` result that are not losses."""


@dataclass
class EpochStats:
    """Running totals of one model's optimizer steps in an epoch.

    Attributes:
        lr: learning rate of the last step (the schedule's rate before the first).
    """

    lr: float
    totals: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    skipped: int = 0
    samples: int = 0

    def add(self, out: dict[str, float], samples: int) -> None:
        """Count one :func:`train.engine.step.train_step` result ``out``, read as floats
        (:func:`train.engine.step.read_step_values`), of a batch of ``samples`` queries."""
        self.lr = out["lr"]
        self.skipped += int(out["skipped"])
        for name, value in out.items():
            if name not in _STEP_INFO:
                self.totals[name] = self.totals.get(name, 0.0) + value
        self.steps += 1
        self.samples += samples

    def mean(self, name: str) -> float:
        """Mean of the loss ``name`` over the steps counted so far (0 before the first)."""
        return self.totals.get(name, 0.0) / max(self.steps, 1)

    def record(self, seconds: float) -> dict[str, Any]:
        """The metrics-log fields of the epoch, which took ``seconds`` of wall time."""
        return {
            "train": {name: self.mean(name) for name in self.totals},
            "lr": self.lr,
            "steps": self.steps,
            "skipped_steps": self.skipped,
            "samples": self.samples,
            "samples_per_s": self.samples / seconds if seconds > 0 else 0.0,
            "train_seconds": seconds,
        }


PACKAGE = "r2tuning-toolkit"
"""Distribution name whose version ``run.json`` records."""


def improves(value: float, best: float | None) -> bool:
    """Whether ``value`` beats ``best``: the one ranking rule of validations (every headline metric is
    higher-is-better; a first finite value beats ``None``; ties keep the earlier epoch; NaN never wins)."""
    return not math.isnan(value) and (best is None or value > best)


@dataclass
class Best:
    """The best validated epoch so far, and the best value of every metric.

    Attributes:
        metric: key metric (higher is better); its best epoch is ``best.pt``.
        value: its best value (``None`` before the first validation).
        epoch: 1-based epoch of that value.
        metrics: all validation metrics of that epoch.
        per_metric: ``{metric: {"value": best value, "epoch": 1-based epoch}}`` over all validations so
            far, each metric ranked on its own (nncore's EvalHook).
    """

    metric: str
    value: float | None = None
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    per_metric: dict[str, dict[str, Any]] = field(default_factory=dict)

    def update(self, metrics: dict[str, float], epoch: int) -> bool:
        """Rank the validation ``metrics`` of 1-based ``epoch``; returns whether the key metric improved.

        Raises:
            ConfigError: ``metrics`` lacks the key metric.
        """
        value = key_value(metrics, self.metric)
        for name, v in metrics.items():
            held = self.per_metric.get(name)
            if improves(v, None if held is None else held["value"]):
                self.per_metric[name] = {"value": v, "epoch": epoch}
        if not improves(value, self.value):
            return False
        self.value, self.epoch, self.metrics = value, epoch, dict(metrics)
        return True

    def summary(self, split: str) -> dict[str, Any]:
        """The content of ``best.json``: the key-metric epoch (``epoch``, ``key_metric``, ``value``,
        ``split``, ``metrics``) and ``per_metric``."""
        return {
            "epoch": self.epoch, "key_metric": self.metric, "value": self.value, "split": split,
            "metrics": self.metrics, "per_metric": self.per_metric,
        }

    def to_meta(self) -> dict[str, Any]:
        """Checkpoint data (``last.pt`` ``meta['best']``)."""
        return {
            "metric": self.metric, "value": self.value, "epoch": self.epoch, "metrics": self.metrics,
            "per_metric": self.per_metric,
        }

    def load_meta(self, saved: dict[str, Any]) -> None:
        """Restore from :meth:`to_meta` data (a resumed run; a ``last.pt`` written before per-metric bests
        existed restores an empty ``per_metric``)."""
        self.value, self.epoch = saved.get("value"), saved.get("epoch")
        self.metrics = dict(saved.get("metrics") or {})
        self.per_metric = {name: dict(entry) for name, entry in (saved.get("per_metric") or {}).items()}


def validation_due(epochs_done: int, val_every: int, epochs: int) -> bool:
    """Whether to validate after ``epochs_done`` epochs: every ``val_every`` epochs and after the last."""
    return epochs_done % val_every == 0 or epochs_done == epochs


def key_value(metrics: dict[str, float], key: str) -> float:
    """``metrics[key]``.

    Raises:
        ConfigError: the validation does not report ``key``, the dataset's key metric (the message lists
            what it reports).
    """
    if key not in metrics:
        known = ", ".join(sorted(metrics)) or "none"
        raise ConfigError(
            f"the validation reports no {key!r}, the dataset's key metric (it reports: {known}); "
            "check the annotations of the validation split (train.val_split)"
        )
    return metrics[key]


def record_validation(
    state: TrainState,
    validation: Validation,
    best: Best,
    paths: RunPaths,
    identity: dict[str, Any],
    split: str,
) -> dict[str, Any]:
    """Rank the validation of ``state``'s model after epoch ``state.epoch`` (1-based, completed).

    Updates ``best`` (:meth:`Best.update`); a new key-metric best writes ``best.pt`` (weights, epoch,
    metrics, store ``identity``, ``split``) and the predictions ``val_preds.jsonl``; then ``best.json``
    (:meth:`Best.summary`) is rewritten, since any metric's best may have changed.

    Returns:
        the metrics-log fields ``val`` and ``val_samples_per_s``.

    Raises:
        ConfigError: the validation does not report ``best.metric``.
    """
    if best.update(validation.metrics, state.epoch):
        write_predictions(paths.val_preds, validation.predictions)
        meta = {"epoch": state.epoch, "metrics": validation.metrics, "store": identity, "split": split}
        save_checkpoint(paths.best, state.model, state.cfg, meta)
    if best.epoch is not None:
        write_json_atomic(paths.best_json, best.summary(split))
    return {"val": validation.metrics, "val_samples_per_s": validation.samples_per_s}


def end_epoch(
    state: TrainState,
    record: dict[str, Any],
    best: Best,
    paths: RunPaths,
    identity: dict[str, Any],
    rng: dict[str, Any],
) -> None:
    """Append ``record`` to ``metrics.jsonl``; with ``train.save_every_epoch`` write
    :func:`epoch_checkpoint` (weights, ``epoch``, store ``identity``, and ``metrics`` of the epoch's
    validation if any: the ``best.pt`` format); then ``last.pt``: weights, optimizer and counters, the
    generator states ``rng`` (:func:`train.engine.rng.capture_rng`), ``best``, the store ``identity`` and
    the loader position. The epoch file comes first, so a run resumed after a crash between the two
    redoes the epoch and writes it again."""
    cfg = state.cfg
    append_metrics(paths.metrics, record)
    if cfg.train.save_every_epoch:
        meta = {"epoch": state.epoch, "store": identity}
        if "val" in record:
            meta["metrics"] = record["val"]
        save_checkpoint(epoch_checkpoint(paths, state.epoch), state.model, cfg, meta)
    save_checkpoint(paths.last, state.model, cfg, {
        "train_state": state_meta(state),
        "rng": rng,
        "best": best.to_meta(),
        "store": identity,
        "loader": {"seed": cfg.train.seed, "passes_done": state.epoch * cfg.train.repeat},
    })


def epoch_checkpoint(paths: RunPaths, epoch: int) -> Path:
    """``epoch_{epoch:03d}.pt`` in the run directory: the weights after 1-based ``epoch``."""
    return paths.root / f"epoch_{epoch:03d}.pt"


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process, for ``run.json``: ``r2 ...`` when it is the ``r2`` command
    (console script or ``python -m r2``), else a note that the run is a library call and from which
    program (``argv`` defaults to ``sys.argv``)."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]) if argv else Path()
    if program.name == "r2" or program.parts[-2:] == ("r2", "__main__.py"):
        return shlex.join(["r2", *argv[1:]])
    return f"library call (not the r2 command) in: {shlex.join(argv) or 'python'}"


def package_version() -> str:
    """Installed version of :data:`PACKAGE` (``'unknown'`` when it is not installed)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def git_revision(root: Path | None = None) -> str | None:
    """Commit of the git checkout the package runs from, read from ``.git`` without running git (a
    worktree's ``.git`` file and packed refs included); ``None`` when it is not a checkout (an installed
    package) or the files cannot be read. ``root`` defaults to the folder holding the package."""
    root = Path(__file__).resolve().parents[2] if root is None else root
    try:
        gitdir = root / ".git"
        if gitdir.is_file():
            gitdir = (root / gitdir.read_text(encoding="utf-8").split(":", 1)[1].strip()).resolve()
        head = (gitdir / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head[4:].strip()
        common = gitdir
        if (gitdir / "commondir").is_file():
            common = (gitdir / (gitdir / "commondir").read_text(encoding="utf-8").strip()).resolve()
        for base in (gitdir, common):
            if (base / ref).is_file():
                return (base / ref).read_text(encoding="utf-8").strip() or None
        for line in (common / "packed-refs").read_text(encoding="utf-8").splitlines():
            sha, _, name = line.partition(" ")
            if name.strip() == ref:
                return sha
    except (OSError, IndexError, UnicodeDecodeError):
        return None
    return None


def run_provenance(paths: RunPaths) -> dict[str, Any]:
    """``run.json`` fields about the process: ``command`` (:func:`command_line`), ``version``
    (:func:`package_version`), ``git_revision``, ``started_at`` and ``resumed_at`` (UTC, ISO 8601).

    A run directory that already has a ``run.json`` is being resumed: its ``command`` and ``started_at``
    are kept and this start is appended to ``resumed_at`` (empty for a fresh run; ``started_at`` is
    ``None`` for a run whose ``run.json`` predates these fields); version and revision are this process's."""
    now = utc_now()
    info: dict[str, Any] = {
        "command": command_line(), "version": package_version(), "git_revision": git_revision(),
        "started_at": now, "resumed_at": [],
    }
    earlier = read_json(paths.run)
    if earlier is not None:
        info["command"] = earlier.get("command", info["command"])
        info["started_at"] = earlier.get("started_at")
        info["resumed_at"] = [*(earlier.get("resumed_at") or []), now]
    return info


def record_run_end(paths: RunPaths) -> None:
    """Add ``ended_at`` (UTC, ISO 8601) to ``run.json`` (rewritten atomically) when the run ends."""
    info = read_json(paths.run) or {}
    write_json_atomic(paths.run, {**info, "ended_at": utc_now()})


def record_interrupt(paths: RunPaths, reason: str, epoch: int, step: int, saved: int) -> None:
    """Add the ``interrupted`` record to ``run.json`` (rewritten atomically) when the run is stopped:
    ``reason`` (``SIGTERM``, ``SIGINT``), ``at`` (UTC, ISO 8601), the 1-based ``epoch`` in progress, the
    optimizer ``step`` reached and ``epochs_done``, the ``saved`` epochs ``last.pt`` holds (where
    ``--resume`` continues). A resumed run's ``run.json`` no longer has it."""
    info = read_json(paths.run) or {}
    stop = {"reason": reason, "at": utc_now(), "epoch": epoch, "step": step, "epochs_done": saved}
    write_json_atomic(paths.run, {**info, "interrupted": stop})


def log_event(paths: RunPaths, text: str) -> None:
    """Append ``text`` to ``train.log`` after the UTC time (``2025-01-31T12:00:00+00:00  text``)."""
    append_log(paths.train_log, f"{utc_now()}  {text}")


def epoch_line(record: dict[str, Any], best: Best, epochs: int, seconds: float, eta: float | None) -> str:
    """The line of a finished epoch, e.g. ``epoch 3/30  loss 1.234 (cls 0.2 reg 0.5 sal 0.3 ...)
    MR-full-R1@0.5 41.20 (best 42.00 @ 2)  62 s  ETA 28 min``.

    Args:
        record: its metrics-log record (``epoch``, ``train`` mean losses, ``val`` metrics if validated,
            ``skipped_steps``).
        best: the best validation so far (this epoch's included); its key metric is shown.
        epochs: epochs of the run.
        seconds: wall time of the epoch, validation and files included.
        eta: seconds the run still needs, ``None`` after the last epoch.
    """
    losses = dict(record.get("train") or {})
    parts = [f"epoch {record['epoch']}/{epochs}"]
    if "loss" in losses:
        total = losses.pop("loss")
        terms = " ".join(f"{name.removeprefix('loss_')} {value:.3g}" for name, value in losses.items())
        parts.append(f"loss {total:.4g}" + (f" ({terms})" if terms else ""))
    if record.get("skipped_steps"):
        parts.append(f"{record['skipped_steps']} steps skipped")
    val = record.get("val") or {}
    held = f"best {best.value:.2f} @ {best.epoch}" if best.value is not None else "no best yet"
    if best.metric in val:
        parts.append(f"{best.metric} {val[best.metric]:.2f} ({held})")
    elif best.value is not None:
        parts.append(f"{best.metric} {held}")
    parts.append(duration_text(seconds))
    if eta is not None:
        parts.append(f"ETA {duration_text(eta)}")
    return "  ".join(parts)
