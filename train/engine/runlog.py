"""The run directory: its files, refusing to clobber an earlier run, atomic JSON and the metrics log.

Layout of ``RUN_DIR``::

    config.json       resolved RunConfig (RunConfig.from_dict reads it back)
    run.json          store path + manifest, splits, seed, device, command, version, git revision, times
    metrics.jsonl     one JSON object per completed epoch (train losses, lr, samples/s, val metrics)
    last.pt           checkpoint after the last completed epoch (weights + optimizer + RNG states)
    best.pt           checkpoint of the best validation epoch (the dataset's key metric)
    best.json         that epoch's metrics, and the best value and epoch of every metric
    val_preds.jsonl   that epoch's validation predictions (QVHighlights submission format)
    epoch_NNN.pt      every epoch's weights (``train.save_every_epoch`` only)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards.atomic import atomic_path, writes_to
from shards.errors import R2Error


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
            f"run directory {root} is not empty (an earlier run?); pass --resume to continue it "
            "or choose another --out"
        )
    if resume and busy and not paths.last.is_file():
        files = sorted(root.iterdir())
        if not all(_is_run_file(f) for f in files):
            raise RunDirError(
                f"cannot resume: {root} holds no last.pt (no completed epoch) and files of no run; "
                "use another --out"
            )
        for file in files:
            file.unlink()
        busy = False
    root.mkdir(parents=True, exist_ok=True)
    return paths, resume and busy


def _is_run_file(path: Path) -> bool:
    """Whether ``path`` is a file a run writes (see the module docstring), or a temporary one of them."""
    name = path.name
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:-4].rsplit(".", 1)[0]  # atomic_path's ".<name>.<random>.tmp"
    known = {"config.json", "run.json", "metrics.jsonl", "last.pt", "best.pt", "best.json", "val_preds.jsonl"}
    return path.is_file() and (name in known or re.fullmatch(r"epoch_\d{3,}\.pt", name) is not None)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` via a temporary file and ``os.replace``."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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
