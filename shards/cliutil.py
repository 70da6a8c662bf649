"""What every ``r2`` command shares: user errors become one ``error: ...`` line and exit status 2, and
SIGTERM stops a long command the way Ctrl-C does.

User errors are :class:`R2Error` and the failed writes a user can fix: a full disk, an exceeded
quota, a read-only or forbidden folder (an :class:`OSError`; :func:`shards.atomic.writes_to` makes
it name the path written).

Batch schedulers pre-empt a job with SIGTERM. Inside :func:`sigterm_as_interrupt` it raises
:class:`Terminated` (a ``KeyboardInterrupt``) in the main thread, so the clean stop written for
Ctrl-C runs (files finished, a line saying how to resume); the command then exits with
:func:`interrupt_exit_code` (143 for SIGTERM, 130 for Ctrl-C, the shells' convention).
"""

from __future__ import annotations

import errno
import logging
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from shards.atomic import WRITE_ERRNOS
from shards.errors import R2Error

USER_ERROR_EXIT = 2
"""Exit status of a command stopped by a user error (a full disk and a read-only folder included)."""

_RESUME = (
    "what was written before is intact: free some space, then run the same command again to resume "
    "(`r2 train` with --resume)"
)


def duration_text(seconds: float) -> str:
    """``seconds`` for a progress line or an estimate, to the precision a person reads it at: ``45 s``,
    ``28 min``, ``3.2 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _size(nbytes: float) -> str:
    """``nbytes`` for a message: ``512 bytes``, ``1.5 MB``, ..."""
    units = ("bytes", "kB", "MB", "GB", "TB")
    power = 0
    while nbytes >= 1000 and power < len(units) - 1:
        nbytes /= 1000
        power += 1
    return f"{nbytes:.0f} bytes" if power == 0 else f"{nbytes:.1f} {units[power]}"


def _space(path: Path) -> str:
    """The free space on the file system of ``path`` (its nearest existing folder) and, when ``path`` is a
    file being replaced, its size (at least that much is needed): `` (90.1 kB free there; the file it
    replaces takes 612.2 kB)``."""
    for folder in (path, *path.parents):
        if folder.exists():
            free = f"{_size(shutil.disk_usage(folder).free)} free there"
            if path.is_file():
                free += f"; the file it replaces takes {_size(path.stat().st_size)}"
            return f" ({free})"
    return ""


def write_error_message(err: OSError) -> str | None:
    """The ``error:`` line of a failed write the user can fix (``None`` for any other error).

    A full disk or exceeded quota names the path, the free space left there and that re-running
    resumes; a read-only or forbidden path says to choose another output folder.
    """
    if err.errno not in WRITE_ERRNOS:
        return None
    where = "a file" if err.filename is None else str(err.filename)
    if err.errno == errno.ENOSPC:
        space = "" if err.filename is None else _space(Path(where))
        return f"no space left on the device writing {where}{space}; {_RESUME}"
    if err.errno == errno.EDQUOT:
        return f"disk quota exceeded writing {where}; {_RESUME}"
    if err.errno == errno.EROFS:
        return f"cannot write {where}: read-only file system; choose another output folder (--out)"
    return f"permission denied: {where}; fix its permissions or choose another output folder (--out)"


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user error raised in the block into ``error: <message>`` on stderr and exit status 2.

    User errors: an :class:`R2Error` (its message) and a write failed for lack of space or
    permission (:func:`write_error_message`). Exits with :class:`SystemExit`, so it serves inside a
    typer command and around a whole app alike.
    """
    try:
        yield
    except R2Error as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(USER_ERROR_EXIT) from None
    except OSError as err:
        message = write_error_message(err)
        if message is None:
            raise
        typer.echo(f"error: {message}", err=True)
        raise SystemExit(USER_ERROR_EXIT) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM received inside :func:`sigterm_as_interrupt` (handled like Ctrl-C)."""


INTERRUPT_EXIT = 130
"""Exit status of a command stopped by Ctrl-C (128 + SIGINT)."""
TERMINATED_EXIT = 143
"""Exit status of a command stopped by SIGTERM (128 + SIGTERM)."""


def interrupt_exit_code(err: KeyboardInterrupt) -> int:
    """143 for :class:`Terminated`, 130 for Ctrl-C."""
    return TERMINATED_EXIT if isinstance(err, Terminated) else INTERRUPT_EXIT


def interrupt_name(err: KeyboardInterrupt) -> str:
    """``terminated (SIGTERM)`` or ``interrupted`` for the line a command prints when it stops."""
    return "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """In the block, SIGTERM raises :class:`Terminated` in the main thread (the previous handler is put
    back after). Outside the main thread (where Python cannot set handlers) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


TOOLKIT_LOGGERS = ("shards", "extract", "train", "eval", "r2")
"""The packages whose log lines a command shows (other libraries keep their own settings)."""


class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return f"warning: {message}" if record.levelno >= logging.WARNING else message


def configure_logging(level: int = logging.INFO) -> None:
    """Show the toolkit's log lines on stderr from ``level`` up: information as it is, warnings as
    ``warning: ...`` (called by the ``r2`` command; a library user keeps their own set-up). Calling it
    again replaces the handler it added (on the stderr of the time)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_LineFormatter())
    for name in TOOLKIT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers = [h for h in logger.handlers if not isinstance(h.formatter, _LineFormatter)]
        logger.addHandler(handler)
        logger.propagate = False  # a library that sets up the root logger (open_clip) would repeat each line
