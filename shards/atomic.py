"""Write files atomically (a temporary name in the same folder, then one ``os.replace``) and name the
path a failed write was about (disk full, read-only or forbidden folder)."""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
"""``errno`` values of a write the user can fix: disk full, quota exceeded, read-only, not allowed."""


def os_error_in(err: BaseException) -> OSError | None:
    """``err`` if it is an :class:`OSError`, else the first one it was raised from or during.

    ``torch.save`` reports a full disk as a ``RuntimeError`` raised while handling the ``OSError``.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _concerns(filename: object, path: Path) -> bool:
    """Whether an error about ``filename`` (``None``: unnamed) is an error about writing ``path``: the
    path itself, a file below it, or a temporary sibling ``.<name>.*`` of it."""
    if filename is None:
        return True
    if not isinstance(filename, str | bytes | os.PathLike):
        return False
    file = Path(os.fsdecode(filename))
    return (
        file == path
        or path in file.parents
        or (file.parent == path.parent and file.name.startswith(f".{path.name}."))
    )


@contextmanager
def writes_to(path: str | Path) -> Iterator[None]:
    """Name ``path`` in a disk-full, read-only or permission error of a write to it in the block.

    An :class:`OSError` with an ``errno`` of :data:`WRITE_ERRNOS` about ``path``, a file below it, a
    temporary sibling, or no file at all (``write`` errors name none) is raised again with ``path`` as
    its ``filename``; also when ``torch`` wrapped it in another exception. Other errors pass as they are.
    """
    path = Path(path)
    try:
        yield
    except Exception as exc:
        err = os_error_in(exc)
        if err is None or err.errno not in WRITE_ERRNOS or not _concerns(err.filename, path):
            raise
        raise OSError(err.errno, err.strerror, str(path)) from exc


_UMASK_LOCK = threading.Lock()


def file_mode() -> int:
    """The mode a new file gets from the process's umask (``0o666 & ~umask``: 0644 under umask 022),
    as ``open`` would give it; ``mkstemp`` alone makes files 0600."""
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        umask = os.umask(0o077)
        os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file next to ``path`` (missing parent folders are created) for the block to write.

    When the block completes the file replaces ``path``; when it raises the file is removed, so
    ``path`` never holds half-written data. The file gets the mode the umask gives new files
    (:func:`file_mode`), so colleagues read runs as they read any other file. A full disk or an
    unwritable folder raises an :class:`OSError` naming ``path`` (:func:`writes_to`).
    """
    path = Path(path)
    with writes_to(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, file_mode())
        finally:
            os.close(fd)
        try:
            yield Path(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
