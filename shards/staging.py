"""Atomic writes into a store: stage under ``<store>/_staging/``, commit with one ``rename``; the writer lock.

A staging entry is named ``<label>+<host>-<space>-<pid>-<random>`` (labels: ``video.<vid>``,
``queries``, ``annotations``; ``host`` is the first 16 characters of the host name, for people;
``space`` identifies the pid space of the writer: this boot of this machine and its pid namespace).
Writers on several processes or hosts never collide. An entry is removed by another writer only
when its writer is provably gone: it ran in this pid space and its pid no longer exists, or it
has not been touched for :data:`STALE_AFTER_S` (a writer elsewhere, whose pid cannot be checked).
Readers never look inside.

The store's writer lock (:meth:`Staging.lock`) is an exclusive ``flock`` on ``_staging/zarr.json``
(a file every store has and nothing replaces; the lock is advisory, readers never take it), held
around the read-merge-replace of the annotations. The kernel (or the NFS lock manager) releases
it when its holder dies, so a killed writer never leaves the store locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from shards.errors import StoreError
from shards.rawarray import fsync_path

STALE_AFTER_S = 24 * 3600.0
"""A staging entry of a writer whose pid cannot be checked (another host or pid namespace) is
removed once neither it nor a file in it was modified for this many seconds."""

LOCK_TIMEOUT_S = 600.0
"""How long :meth:`Staging.lock` waits for another holder before it gives up with a :class:`StoreError`."""

_COMMIT_TRIES = 100
_LOCKS_IN_PROCESS = threading.Lock()
"""``flock`` on NFS is a POSIX lock, which the threads of one process share: they queue here first."""


@cache
def _pid_space() -> str | None:
    """12 hex digits naming this boot of this machine and this process's pid namespace (pids are
    comparable within one), or ``None`` where ``/proc`` does not tell."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return hashlib.sha256(f"{boot}:{namespace}".encode()).hexdigest()[:12]


def _writer_tag() -> str:
    """``<host>-<space>-<pid>-<random>`` of a new staging entry of this process."""
    host = socket.gethostname()[:16].replace("+", "_") or "host"
    return f"{host}-{_pid_space() or '0'}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _last_touched(entry: Path) -> float:
    """Newest modification time (seconds since the epoch) of ``entry`` and the files in it."""
    newest = entry.lstat().st_mtime
    with contextlib.suppress(OSError), os.scandir(entry) as children:
        for child in children:
            with contextlib.suppress(OSError):
                newest = max(newest, child.stat(follow_symlinks=False).st_mtime)
    return newest


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
        path = self.path / f"{label}+{_writer_tag()}"
        path.mkdir()
        return path

    def _is_dead(self, name: str, now: float) -> bool:
        """Whether the writer of entry ``name`` is provably gone (see the module docstring)."""
        tag = name.rpartition("+")[2]
        fields = tag.rsplit("-", 3)
        space = _pid_space()
        if len(fields) == 4 and space is not None and fields[1] == space and fields[2].isdigit():
            return not _pid_exists(int(fields[2]))
        try:
            return now - _last_touched(self.path / name) > STALE_AFTER_S
        except OSError:
            return False

    def remove_dead(self, label: str) -> None:
        """Delete the entries of ``label`` whose writer is provably gone (a killed write)."""
        now = time.time()
        for name in self.entries():
            if name.rpartition("+")[0] == label and self._is_dead(name, now):
                shutil.rmtree(self.path / name, ignore_errors=True)

    @contextmanager
    def stage(self, label: str) -> Iterator[Path]:
        """A new empty staging folder for a write of ``label``; removed on exit unless committed.

        Leftovers of earlier writes of the same label whose writer is provably gone are deleted first;
        entries of live writers (other processes writing now) are left alone.
        """
        self.remove_dead(label)
        tmp = self._new_dir(label)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit_dir(self, tmp: Path, final: Path, label: str) -> None:
        """Rename the folder ``tmp`` to ``final`` atomically; an existing ``final`` (an older write, or
        one committed meanwhile by another writer: the last commit wins) is moved aside into a
        staging entry of ``label`` and deleted."""
        aside: list[Path] = []
        try:
            for _ in range(_COMMIT_TRIES):
                try:
                    os.rename(tmp, final)
                    break
                except OSError as err:
                    if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                aside.append(self._new_dir(label))
                with contextlib.suppress(FileNotFoundError):
                    os.rename(final, aside[-1] / "old")
            else:
                raise StoreError(f"could not commit {final}: other writers kept replacing it")
        finally:
            for path in aside:
                shutil.rmtree(path, ignore_errors=True)
        self._flush(final.parent)

    def discard(self, path: Path, label: str) -> None:
        """Delete the folder ``path`` at once for readers (moved into a staging entry of ``label``,
        then removed); nothing happens if it is gone already (another writer discarded it)."""
        entry = self._new_dir(label)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, entry / "old")
        finally:
            shutil.rmtree(entry, ignore_errors=True)

    def commit_file(self, tmp: Path, final: Path) -> None:
        """Replace the file ``final`` by ``tmp`` atomically (``tmp`` is flushed first)."""
        if self.fsync:
            fsync_path(tmp)
        os.replace(tmp, final)
        self._flush(final.parent)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's exclusive writer lock (waits for other holders, on any host whose file
        system supports ``flock``; at most :data:`LOCK_TIMEOUT_S`, then :class:`StoreError`)."""
        lock_file = self.path / "zarr.json"
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        if not _LOCKS_IN_PROCESS.acquire(timeout=LOCK_TIMEOUT_S):
            raise _still_locked(lock_file)
        try:
            fd = os.open(lock_file, os.O_RDWR)  # NFS emulates flock by a POSIX lock: needs write access
            try:
                _acquire(fd, lock_file, deadline)
                yield
            finally:
                os.close(fd)
        finally:
            _LOCKS_IN_PROCESS.release()

    def _flush(self, folder: Path) -> None:
        if self.fsync:
            fsync_path(folder)


def _still_locked(lock_file: Path) -> StoreError:
    return StoreError(
        f"store {lock_file.parents[1]} stayed locked by another writer for {LOCK_TIMEOUT_S:g} s "
        f"(flock on {lock_file}); if a writer hangs, stop it and write again"
    )


def _acquire(fd: int, lock_file: Path, deadline: float) -> None:
    """Take the exclusive ``flock`` on ``fd``, polling until ``deadline`` (:func:`time.monotonic`);
    :class:`StoreError` then, or at once when the file system has no locks."""
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as err:
            raise StoreError(
                f"cannot lock {lock_file}: {err.strerror}; writing annotations needs a file system with "
                "file locks (on NFS: the lock manager or NFSv4; Lustre: mount with -o flock)"
            ) from None
        if time.monotonic() > deadline:
            raise _still_locked(lock_file)
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
