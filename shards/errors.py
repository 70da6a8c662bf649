"""User-facing errors.

Every error a user can cause (bad file, bad video, unknown dataset, incompatible store,
wrong checkpoint, ...) is raised as an :class:`R2Error` subclass whose message names the
thing at fault and what to do. The ``r2`` command prints the message on one line and exits
with status 2 instead of showing a traceback. :func:`option` words the way out in the terms the user
typed: an ``r2`` option, or a ``make`` variable.
"""

from __future__ import annotations

import os

VIA_MAKE = "R2_VIA_MAKE"
"""Environment variable the Makefile sets for the ``r2`` commands it runs: a way out is then named in
make's terms (:func:`option`)."""


def option(flag: str, make_variable: str) -> str:
    """How an error message names a way out: the ``r2`` option (``--resume``, ``--out DIR``), or the
    ``make`` variable (``RESUME=1``, ``RUN=DIR``) when the command came from ``make``."""
    return make_variable if os.environ.get(VIA_MAKE) else flag



class R2Error(Exception):
    """Base class of all errors caused by user input; the message is shown verbatim."""


class AnnotationError(R2Error):
    """A malformed annotation file; the message starts with ``file:line:``."""


class UnknownDatasetError(R2Error):
    """A dataset name that is not in the registry; the message lists the valid names."""


class StoreError(R2Error):
    """A missing, corrupt or incompatible feature store."""


class VideoError(R2Error):
    """A video file that cannot be decoded (missing, truncated, no video stream, ...)."""


class CheckpointError(R2Error):
    """A missing, corrupt or incompatible checkpoint."""


class ConfigError(R2Error):
    """An unknown preset, an unknown config key or a value of the wrong type."""
