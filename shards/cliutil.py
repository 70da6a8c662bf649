"""What every ``r2`` command shares: user errors become one ``error: ...`` line and exit status 2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from shards.errors import R2Error

USER_ERROR_EXIT = 2
"""Exit status of a command stopped by a user error."""


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn an :class:`R2Error` raised in the block into ``error: <message>`` on stderr and exit status 2.

    Exits with :class:`SystemExit`, so it serves inside a typer command and around a whole app alike.
    """
    try:
        yield
    except R2Error as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(USER_ERROR_EXIT) from None
