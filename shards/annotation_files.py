"""Which annotation files a command reads, and the split of each.

``--annotations`` takes a file, ``FILE:SPLIT``, or a folder. A file's split is the one given with it,
else the one its name names (:func:`infer_split`). A folder gives one file per split
(:func:`select_annotation_files`): the dataset's usual names in the order of :data:`KNOWN_FILES`
(the first present wins, e.g. QVHighlights' ``highlight_test_with_gt.jsonl`` before
``highlight_test_release.jsonl``), else the only ``*.jsonl`` of that split; two unknown files of one
split are an error that names them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from shards.datasets import get_dataset
from shards.errors import AnnotationError

SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
"""Words of a file name (or after ``FILE:``) that name a split, and the split they name."""

KNOWN_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "qvhighlights": {
        "train": ("qvhighlights_train.jsonl", "highlight_train_release.jsonl"),
        "val": ("qvhighlights_val.jsonl", "highlight_val_release.jsonl"),
        "test": ("qvhighlights_test.jsonl", "highlight_test_with_gt.jsonl", "highlight_test_release.jsonl"),
    },
    "charades": {
        "train": ("charades_train.jsonl", "charades_train_release.jsonl"),
        "test": ("charades_test.jsonl", "charades_test_release.jsonl"),
    },
    "tacos": {
        "train": ("train.jsonl", "tacos_train.jsonl", "tacos_train_release.jsonl"),
        "val": ("val.jsonl", "tacos_val.jsonl", "tacos_val_release.jsonl"),
        "test": ("test.jsonl", "tacos_test.jsonl", "tacos_test_release.jsonl"),
    },
    "ego4d": {
        "train": ("nlq_train.jsonl", "ego4d_train.jsonl"),
        "val": ("nlq_val.jsonl", "ego4d_val.jsonl"),
    },
    "youtube": {
        "train": ("youtube_train.jsonl", "youtube_highlight_train_release.jsonl"),
        "val": ("youtube_val.jsonl", "youtube_highlight_val_release.jsonl"),
    },
    "tvsum": {
        "train": ("tvsum_train.jsonl", "tvsum_train_release.jsonl"),
        "val": ("tvsum_val.jsonl", "tvsum_val_release.jsonl"),
    },
}
"""Per dataset and split, the usual annotation file names, preferred first (docs/datasets.md)."""


def infer_split(path: str | Path) -> str | None:
    """Split named by the file name (``train`` / ``val`` / ``test``), ``None`` if none or ambiguous.

    The name is cut into words at every non-alphanumeric character, so
    ``highlight_test_with_gt.jsonl`` → ``test`` and ``nlq_val.jsonl`` → ``val``.
    """
    words = re.split(r"[^a-z0-9]+", Path(path).name.lower())
    found = {SPLIT_WORDS[w] for w in words if w in SPLIT_WORDS}
    return found.pop() if len(found) == 1 else None


def annotation_file(arg: str | Path) -> tuple[Path, str | None]:
    """``FILE`` or ``FILE:SPLIT`` (as given to ``--annotations``) → ``(path, split or None)``.

    ``SPLIT`` is any of :data:`SPLIT_WORDS` (normalized to ``train``/``val``/``test``); anything
    else after the last colon belongs to the file name.
    """
    head, sep, tail = str(arg).rpartition(":")
    if sep and head and tail.lower() in SPLIT_WORDS:
        return Path(head), SPLIT_WORDS[tail.lower()]
    return Path(arg), None


@dataclass
class Selection:
    """The annotation files a command reads.

    Attributes:
        files: ``(path, split)`` in the order given (a folder's files in split order); ``split`` is
            ``None`` when it is left to the file name.
        skipped: ``(path, reason)`` of the files of a folder that were not taken.
    """

    files: list[tuple[Path, str | None]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def describe(self) -> str:
        """One line naming the files used per split and the ones left out (with why)."""
        used = ", ".join(f"{split or infer_split(path) or '?'} {path}" for path, split in self.files)
        line = f"annotations: {used}"
        if self.skipped:
            line += "; not used: " + ", ".join(f"{path.name} ({why})" for path, why in self.skipped)
        return line


def select_annotation_files(folder: str | Path, dataset: str) -> Selection:
    """One ``*.jsonl`` file per split of ``folder`` for ``dataset`` (module docstring).

    Raises:
        AnnotationError: no ``*.jsonl`` file with a split of the dataset in its name, or two files of one
            split that are not among the usual names.
    """
    spec = get_dataset(dataset)
    folder = Path(folder)
    by_split: dict[str, list[Path]] = {}
    selection = Selection()
    for path in sorted(folder.glob("*.jsonl")):
        split = infer_split(path)
        if split in spec.splits:
            by_split.setdefault(split, []).append(path)
        else:
            reason = "no split in its name" if split is None else f"{spec.title} has no {split} split"
            selection.skipped.append((path, reason))
    if not by_split:
        raise AnnotationError(
            f"{folder}: no annotation file of {spec.title} found (*.jsonl with one of "
            f"{', '.join(spec.splits)} in its name); name the files with --annotations FILE:SPLIT"
        )
    known = KNOWN_FILES.get(spec.name, {})
    for split in spec.splits:
        candidates = by_split.get(split, [])
        if not candidates:
            continue
        ranked = sorted(candidates, key=lambda p: _rank(p.name, known.get(split, ())))
        chosen = ranked[0]
        if len(ranked) > 1 and _rank(chosen.name, known.get(split, ())) == len(known.get(split, ())):
            names = ", ".join(p.name for p in ranked)
            raise AnnotationError(
                f"{folder}: {len(ranked)} {split} annotation files ({names}); keep one per split there or "
                f"name the files to read with --annotations FILE:{split}"
            )
        selection.files.append((chosen, split))
        selection.skipped += [(p, f"{split}: {chosen.name} preferred") for p in ranked[1:]]
    return selection


def _rank(name: str, preferred: tuple[str, ...]) -> int:
    return preferred.index(name) if name in preferred else len(preferred)


def resolve_annotation_args(args: list[str | Path] | tuple[str | Path, ...], dataset: str) -> Selection:
    """The files of ``--annotations`` values: files, ``FILE:SPLIT`` or folders (module docstring).

    Raises:
        AnnotationError: a folder without usable files (:func:`select_annotation_files`).
    """
    selection = Selection()
    for arg in args:
        path, split = annotation_file(arg)
        if split is None and path.is_dir():
            found = select_annotation_files(path, dataset)
            selection.files += found.files
            selection.skipped += found.skipped
        else:
            selection.files.append((path, split))
    return selection
