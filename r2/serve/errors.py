"""The error the API answers with (an HTTP status and one sentence for the page); the limits' messages."""

from __future__ import annotations


class ApiError(Exception):
    """A request the server refuses; the page shows ``message`` as it is.

    Attributes:
        status: the HTTP status of the answer (4xx).
        message: one sentence naming what is wrong and what to do.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def too_large(max_bytes: int) -> str:
    """The message for an upload of more than ``max_bytes`` bytes."""
    return (
        f"The upload is larger than the {max_bytes / 1e6:g} MB this server takes "
        "(r2 serve --max-upload-mb): cut the video or start the server with a larger limit."
    )


def too_long(name: str, max_seconds: float, duration: float | None) -> str:
    """The message for a video ``name`` longer than ``max_seconds`` (``duration`` in seconds, ``None``
    when the container does not say and decoding found it out)."""
    lasts = "more than" if duration is None else f"{duration / 60:.1f} minutes, more than"
    return (
        f"{name} lasts {lasts} the {max_seconds / 60:g} minutes this server takes "
        "(r2 serve --max-minutes): cut the video or start the server with a larger limit."
    )
