"""What a run directory records for one model, epoch by epoch.

- :class:`EpochStats`: the epoch's optimizer steps -> its metrics-log fields (mean losses, lr, steps,
  skipped steps, samples, samples/s).
- :class:`Best` and :func:`record_validation`: rank a validation by the key metric (higher is better);
  a new best writes ``best.pt``, ``best.json`` and ``val_preds.jsonl``.
- :func:`end_epoch`: append the epoch's record to ``metrics.jsonl`` and write ``last.pt``.

The training loop (:mod:`train.engine.loop`) records every model through these functions, so a trial
of a sweep's shared pass leaves the files a separate run leaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from eval.predictions import write_predictions
from shards.errors import ConfigError
from train.checkpoint import save_checkpoint
from train.engine.evaluate import Validation
from train.engine.runlog import RunPaths, append_metrics, write_json_atomic
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
        """Count one :func:`train.engine.step.train_step` result ``out`` of a batch of ``samples`` queries."""
        self.lr = out["lr"]
        self.skipped += int(out["skipped"])
        for name, value in out.items():
            if name not in _STEP_INFO:
                self.totals[name] = self.totals.get(name, 0.0) + value
        self.steps += 1
        self.samples += samples

    def record(self, seconds: float) -> dict[str, Any]:
        """The metrics-log fields of the epoch, which took ``seconds`` of wall time."""
        return {
            "train": {name: value / max(self.steps, 1) for name, value in self.totals.items()},
            "lr": self.lr,
            "steps": self.steps,
            "skipped_steps": self.skipped,
            "samples": self.samples,
            "samples_per_s": self.samples / seconds if seconds > 0 else 0.0,
            "train_seconds": seconds,
        }


@dataclass
class Best:
    """The best validated epoch so far.

    Attributes:
        metric: key metric (higher is better).
        value: its best value (``None`` before the first validation).
        epoch: 1-based epoch of that value.
        metrics: all validation metrics of that epoch.
    """

    metric: str
    value: float | None = None
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def to_meta(self) -> dict[str, Any]:
        """Checkpoint data (``last.pt`` ``meta['best']``)."""
        return {"metric": self.metric, "value": self.value, "epoch": self.epoch, "metrics": self.metrics}

    def load_meta(self, saved: dict[str, Any]) -> None:
        """Restore from :meth:`to_meta` data (a resumed run)."""
        self.value, self.epoch = saved.get("value"), saved.get("epoch")
        self.metrics = dict(saved.get("metrics") or {})


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

    A new best updates ``best`` and writes ``best.pt`` (weights, epoch, metrics, store ``identity``,
    ``split``), ``best.json`` and the predictions ``val_preds.jsonl``.

    Returns:
        the metrics-log fields ``val`` and ``val_samples_per_s``.

    Raises:
        ConfigError: the validation does not report ``best.metric``.
    """
    value = key_value(validation.metrics, best.metric)
    if best.value is None or value > best.value:
        best.value, best.epoch, best.metrics = value, state.epoch, validation.metrics
        write_predictions(paths.val_preds, validation.predictions)
        meta = {"epoch": state.epoch, "metrics": validation.metrics, "store": identity, "split": split}
        save_checkpoint(paths.best, state.model, state.cfg, meta)
        write_json_atomic(paths.best_json, {
            "epoch": state.epoch, "key_metric": best.metric, "value": value, "split": split,
            "metrics": validation.metrics,
        })
    return {"val": validation.metrics, "val_samples_per_s": validation.samples_per_s}


def end_epoch(
    state: TrainState,
    record: dict[str, Any],
    best: Best,
    paths: RunPaths,
    identity: dict[str, Any],
    rng: dict[str, Any],
) -> None:
    """Append ``record`` to ``metrics.jsonl``, then write ``last.pt``: weights, optimizer and counters,
    the generator states ``rng`` (:func:`train.engine.rng.capture_rng`), ``best``, the store ``identity`` and
    the loader position."""
    cfg = state.cfg
    append_metrics(paths.metrics, record)
    save_checkpoint(paths.last, state.model, cfg, {
        "train_state": state_meta(state),
        "rng": rng,
        "best": best.to_meta(),
        "store": identity,
        "loader": {"seed": cfg.train.seed, "passes_done": state.epoch * cfg.train.repeat},
    })
