"""Atomic writes into a store: stage under ``<store>/_staging/``, then commit with one ``rename``.

A staging entry is named ``<label>+<host>-<pid>-<random>`` (labels: ``video.<vid>``, ``queries``,
``annotations``), so writers on several processes or hosts never collide, and a writer can
remove what a killed writer of the same label left behind. Readers never look inside.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shards.rawarray import fsync_path


class Staging:
    """The staging folder of one store.

    Args:
        path: the ``_staging`` folder (exists).
        fsync: flush the parent folder after each commit.
    """

    def __init__(self, path: Path, fsync: bool) -> None:
        self.path = path
        self.fsync = fsync

    def entries(self) -> list[str]:
        """Names of the staging entries (writes in progress or killed), sorted."""
        with os.scandir(self.path) as entries:
            return sorted(e.name for e in entries if e.name != "zarr.json")

    def _new_dir(self, label: str) -> Path:
        tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        path = self.path / f"{label}+{tag}"
        path.mkdir()
        return path

    @contextmanager
    def stage(self, label: str) -> Iterator[Path]:
        """A new empty staging folder for a write of ``label``; removed on exit unless committed.

        Leftovers of earlier writes of the same label (a killed writer) are deleted first.
        """
        for name in self.entries():
            if name.rpartition("+")[0] == label:
                shutil.rmtree(self.path / name, ignore_errors=True)
        tmp = self._new_dir(label)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit_dir(self, tmp: Path, final: Path, label: str) -> None:
        """Rename the folder ``tmp`` to ``final`` atomically; an existing ``final`` is moved aside
        (into a staging entry of ``label``) and deleted."""
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            old = self._new_dir(label)
            os.rename(final, old / "old")
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        self._flush(final.parent)

    def commit_file(self, tmp: Path, final: Path) -> None:
        """Replace the file ``final`` by ``tmp`` atomically (``tmp`` is flushed first)."""
        if self.fsync:
            fsync_path(tmp)
        os.replace(tmp, final)
        self._flush(final.parent)

    def _flush(self, folder: Path) -> None:
        if self.fsync:
            fsync_path(folder)
