"""The run directory: its files, refusing to clobber an earlier run, atomic JSON, the metrics log, the
plain-text log and the TensorBoard scalars.

Layout of ``RUN_DIR``::

    config.json       resolved RunConfig (RunConfig.from_dict reads it back)
    run.json          store path + manifest, splits, seed, device, command, version, git revision, times
    metrics.jsonl     one JSON object per completed epoch (train losses, lr, samples/s, val metrics)
    last.pt           checkpoint after the last completed epoch (weights + optimizer + RNG states)
    best.pt           checkpoint of the best validation epoch (the dataset's key metric)
    best.json         that epoch's metrics, and the best value and epoch of every metric
    val_preds.jsonl   that epoch's validation predictions (QVHighlights submission format)
    epoch_NNN.pt      every epoch's weights (``train.save_every_epoch`` only)
    train.log         plain text, one line per event: start / resume, each epoch, the end or the stop
    tensorboard/      TensorBoard event files (:class:`TensorBoardLog`): losses, lr, metrics
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shards.atomic import atomic_path, writes_to
from shards.errors import R2Error, option

log = logging.getLogger(__name__)


class RunDirError(R2Error):
    """A run directory that cannot be used as asked (an earlier run without --resume, a file, ...)."""


@dataclass(frozen=True)
class RunPaths:
    """Files of one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def run(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "best.pt"

    @property
    def best_json(self) -> Path:
        return self.root / "best.json"

    @property
    def val_preds(self) -> Path:
        return self.root / "val_preds.jsonl"

    @property
    def train_log(self) -> Path:
        return self.root / "train.log"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"


def prepare_run_dir(out_dir: str | Path, resume: bool) -> tuple[RunPaths, bool]:
    """Create ``out_dir`` or check that it may be used.

    With ``resume``, a folder that holds no ``last.pt`` but only files a run writes before it (a run
    stopped in its first epoch, e.g. by a full disk) starts again from scratch: those files are removed.

    Returns:
        the paths and whether an earlier run is resumed (``resume`` and ``last.pt`` exists).

    Raises:
        RunDirError: ``out_dir`` is a file; or it holds files and ``resume`` is off; or ``resume``
            is on, it holds no ``last.pt`` and other files than a run's.
    """
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise RunDirError(f"run directory {root} is a file; give --out a folder")
    paths = RunPaths(root)
    busy = root.is_dir() and any(root.iterdir())
    if busy and not resume:
        raise RunDirError(
            f"run directory {root} is not empty (an earlier run?); pass {option('--resume', 'RESUME=1')} to "
            f"continue it or choose another {option('--out DIR', 'RUN=DIR')}"
        )
    if resume and busy and not paths.last.is_file():
        files = sorted(root.iterdir())
        if not all(_is_run_file(f) for f in files):
            raise RunDirError(
                f"cannot resume: {root} holds no last.pt (no completed epoch) and files of no run; "
                f"use another {option('--out DIR', 'RUN=DIR')}"
            )
        for file in files:
            if file.is_dir():
                shutil.rmtree(file)
            else:
                file.unlink()
        busy = False
    root.mkdir(parents=True, exist_ok=True)
    return paths, resume and busy


def _is_run_file(path: Path) -> bool:
    """Whether ``path`` is a file a run writes (see the module docstring), or a temporary one of them,
    or its ``tensorboard`` folder."""
    if path.is_dir():
        return path.name == "tensorboard"
    name = path.name
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:-4].rsplit(".", 1)[0]  # atomic_path's ".<name>.<random>.tmp"
    known = {
        "config.json", "run.json", "metrics.jsonl", "last.pt", "best.pt", "best.json", "val_preds.jsonl",
        "train.log",
    }
    return path.is_file() and (name in known or re.fullmatch(r"epoch_\d{3,}\.pt", name) is not None)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` via a temporary file and ``os.replace``."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def utc_now() -> str:
    """The current time, ISO 8601 in UTC to the second (``2025-01-31T12:00:00+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` when it is absent or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_interrupt(paths: RunPaths) -> dict[str, Any] | None:
    """The ``interrupted`` record of ``run.json`` (:func:`train.engine.records.record_interrupt`): where
    and why the run stopped; ``None`` when it has none (running, finished, or resumed since)."""
    stop = (read_json(paths.run) or {}).get("interrupted")
    return stop if isinstance(stop, dict) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log (``[]`` when absent).

    A last line without its newline is the append of a run stopped mid-write (a full disk): it is left out.
    """
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one record to the metrics log (one JSON object per line); an OSError names ``path``."""
    with writes_to(path), path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop records of epochs after ``epochs_done`` (written before a crash, redone on resume)."""
    records = [r for r in read_metrics(path) if int(r.get("epoch", 0)) <= epochs_done]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def append_log(path: Path, line: str) -> None:
    """Append one line of text to the run's plain-text log ``train.log``; an OSError names ``path``."""
    with writes_to(path), path.open("a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")


@functools.cache
def _summary_writer() -> type | None:
    """TensorBoard's ``SummaryWriter``, or ``None`` (one warning) when the package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        log.warning("no TensorBoard logs: %s (pip install tensorboard)", err)
        return None
    return SummaryWriter


class TensorBoardLog:
    """Scalars of one run written as TensorBoard event files in ``folder`` (``<run>/tensorboard``).

    Every scalar's step is the optimizer step (``iteration``): a resumed run passes ``purge_step`` =
    its resumed iteration + 1, so TensorBoard drops what the stopped process wrote after its last saved
    epoch and the curves continue. Writing never fails a run: the first error (a full disk, a missing
    ``tensorboard`` package) becomes one warning and the log stops.
    """

    def __init__(self, folder: Path, purge_step: int | None = None) -> None:
        self.folder = folder
        self._writer: Any = None
        writer = _summary_writer()
        if writer is None:
            return
        try:
            self._writer = writer(str(folder), purge_step=purge_step, flush_secs=30)
        except Exception as err:
            self._fail(err)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        """Add ``{prefix}/{name}`` = value for each of ``values`` at optimizer step ``step``."""
        if self._writer is None:
            return
        try:
            for name, value in values.items():
                self._writer.add_scalar(f"{prefix}/{name}", value, step)
        except Exception as err:
            self._fail(err)

    def close(self) -> None:
        """Write what is queued and close the event file (idempotent)."""
        if self._writer is None:
            return
        try:
            self._writer.close()
        except Exception as err:
            self._fail(err)
        self._writer = None

    def _fail(self, err: Exception) -> None:
        log.warning("TensorBoard logs in %s stopped (%s); the run goes on without them", self.folder, err)
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):  # the log is given up already; the warning said so
                writer.close()
