"""One sweep trial on disk: its name, its request, and the bookkeeping around running it.

A trial directory ``SWEEP_DIR/trial-003_lr=1e-4_loss_sal=0.05-1a2b3c4d`` holds

- whatever the trial function writes (the real trainer: resolved config, metrics log, checkpoints);
- ``error.txt``   -- the traceback when the trial failed (removed when it is retried);
- ``done.json``   -- written last, atomically, only when the trial finished: status, metrics, seconds,
  overrides, and the torch intra-op thread count it trained with (``threads``: results may differ in
  the last bits between thread counts, so the best command repeats it with ``r2 train --threads``).

The 8-hex suffix hashes the preset and every override (fixed and swept), so a re-run of the same
sweep -- or of an extended one -- recognises finished trials by hash even when their index changed.
A trial without ``done.json`` (failed, or interrupted by Ctrl-C) is run again.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from train.engine.runlog import write_json_atomic, write_text_atomic

DONE_FILE = "done.json"
ERROR_FILE = "error.txt"
_NAME_PARAMS_MAX = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass(frozen=True)
class TrialRequest:
    """Everything a worker needs to run one trial.

    Attributes:
        index: position in the sweep (0-based).
        name: directory name (``trial-003_<params>-<hash>``).
        trial_dir: absolute path of the trial directory.
        preset: config preset name.
        store: feature store path.
        overrides: fixed then swept overrides ``{key: value text}``, applied in this order.
        params: the swept overrides only.
        device: torch device string (``cpu``, ``cuda``, ``cuda:1``, ``auto``).
        threads: torch intra-op threads for this trial (``None``: leave the process default).
    """

    index: int
    name: str
    trial_dir: str
    preset: str
    store: str
    overrides: dict[str, str]
    params: dict[str, str]
    device: str = "cpu"
    threads: int | None = None

    def override_list(self) -> list[str]:
        """Overrides as ``["key=value", ...]`` for ``train.config.apply_overrides``."""
        return [f"{k}={v}" for k, v in self.overrides.items()]


@dataclass
class TrialRecord:
    """The outcome of one trial as shown in the results.

    Attributes:
        index, name, params: as in :class:`TrialRequest`.
        status: ``ok`` (finished, ``done.json`` present), ``failed`` (``error.txt``) or ``pending``.
        metrics: best validation metrics reported by the trial function (``ok`` only).
        seconds: wall time of the trial (``ok`` / ``failed``).
        error: last line of the error (``failed`` only).
        reused: finished in an earlier run of the sweep and skipped this time.
        shared: trained in a shared pass with other trials (number of models in the pass, else 1).
        threads: torch intra-op threads the trial ran with (``ok`` only; ``None`` when torch was not
            loaded, e.g. a custom trial function, or for a trial finished before this was recorded).
    """

    index: int
    name: str
    params: dict[str, str]
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    reused: bool = False
    shared: int = 1
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TrialFn = Callable[[TrialRequest], dict[str, float]]
"""Runs one trial (writing whatever it likes under ``request.trial_dir``); returns its metrics."""


def trial_hash(preset: str, overrides: dict[str, str]) -> str:
    """8-hex identity of a trial: the preset and the overrides, independent of their order."""
    text = json.dumps({"preset": preset, "overrides": sorted(overrides.items())}, sort_keys=True)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def trial_name(index: int, params: dict[str, str], digest: str) -> str:
    """``trial-003_lr=1e-4_loss_sal=0.05-1a2b3c4d``: file-system safe, parameter part cut at 80 chars."""
    text = "_".join(f"{k}={v}" for k, v in params.items())
    text = _UNSAFE.sub("_", text).strip("_.")[:_NAME_PARAMS_MAX]
    return f"trial-{index:03d}_{text}-{digest}" if text else f"trial-{index:03d}-{digest}"


def find_trial_dir(sweep_dir: Path, digest: str) -> Path | None:
    """The existing directory of the trial with hash ``digest`` (finished ones first), or ``None``."""
    found = sorted(sweep_dir.glob(f"trial-*-{digest}"), key=lambda p: not (p / DONE_FILE).is_file())
    return found[0] if found else None


def read_record(request: TrialRequest) -> TrialRecord:
    """The state of ``request`` on disk: ``ok`` (done.json), ``failed`` (error.txt) or ``pending``."""
    trial_dir = Path(request.trial_dir)
    done = trial_dir / DONE_FILE
    if done.is_file():
        data = json.loads(done.read_text(encoding="utf-8"))
        return TrialRecord(
            request.index, request.name, request.params, "ok", metrics=data["metrics"],
            seconds=data["seconds"], shared=data.get("shared", 1), threads=data.get("threads"),
        )
    error = trial_dir / ERROR_FILE
    if error.is_file():
        lines = error.read_text(encoding="utf-8").strip().splitlines() or [""]
        return TrialRecord(request.index, request.name, request.params, "failed", error=lines[-1])
    return TrialRecord(request.index, request.name, request.params, "pending")


def start_trial(request: TrialRequest) -> None:
    """Create the trial directory and drop the error of an earlier attempt."""
    trial_dir = Path(request.trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / ERROR_FILE).unlink(missing_ok=True)


def finish_trial(
    request: TrialRequest, metrics: dict[str, float], seconds: float, shared: int = 1
) -> TrialRecord:
    """Write ``done.json`` (last, atomically) and return the ``ok`` record, with this process's torch
    thread count (:func:`torch_threads`)."""
    metrics = {k: float(v) for k, v in metrics.items()}
    threads = torch_threads()
    payload = {"status": "ok", "metrics": metrics, "seconds": seconds, "params": request.params,
               "overrides": request.overrides, "shared": shared, "threads": threads}
    write_json_atomic(Path(request.trial_dir) / DONE_FILE, payload)
    return TrialRecord(request.index, request.name, request.params, "ok", metrics, seconds, shared=shared,
                       threads=threads)


def fail_trial(request: TrialRequest, err: BaseException, seconds: float) -> TrialRecord:
    """Write ``error.txt`` with the traceback of ``err`` and return the ``failed`` record."""
    text = "".join(traceback.format_exception(err))
    Path(request.trial_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(request.trial_dir) / ERROR_FILE, text)
    message = f"{type(err).__name__}: {err}".splitlines()[0]
    return TrialRecord(request.index, request.name, request.params, "failed", seconds=seconds, error=message)


def set_torch_threads(threads: int | None) -> None:
    """Limit torch intra-op threads for this process when several trials share the machine."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def torch_threads() -> int | None:
    """Torch intra-op threads of this process, or ``None`` when torch is not loaded (nothing trained)."""
    torch = sys.modules.get("torch")
    return None if torch is None else int(torch.get_num_threads())


def execute_trial(fn: TrialFn, request: TrialRequest) -> TrialRecord:
    """Run ``fn(request)`` with the bookkeeping above; an exception becomes a ``failed`` record.

    ``KeyboardInterrupt`` / ``SystemExit`` are not caught: the trial then stays ``pending``.
    """
    start_trial(request)
    set_torch_threads(request.threads)
    t0 = time.perf_counter()
    try:
        metrics = fn(request)
    except Exception as err:
        return fail_trial(request, err, time.perf_counter() - t0)
    return finish_trial(request, metrics, time.perf_counter() - t0)
