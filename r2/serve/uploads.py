"""The private folder of uploaded videos, and the videos the page may ask about by id.

Uploads are written into a folder made by :func:`tempfile.mkdtemp` (mode 0700, only this user)
under names the server makes; the name a client sends is a label only, never part of a path.
A video not asked about for ``idle_s`` seconds is forgotten and its file removed; closing the
folder removes it whole (so does the interpreter's exit, should the server not close it). Ids are
32 random hex digits made by the server.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import shutil
import tempfile
import time
import unicodedata
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from r2.serve.errors import ApiError, too_large

_ID = re.compile(r"[0-9a-f]{32}")
MAX_NAME = 120
"""Most characters kept of a client's file name (a label)."""


@dataclass
class Video:
    """One video the page may ask about.

    Attributes:
        id: the server-made id the API names it by.
        name: the client's file name (or the sample's), a label only: ``vid`` of the records is its stem.
        path: the file: a server-named upload in the private folder, or a packaged sample.
        digest: sha256 (hex) of the file's bytes; the encoded-video cache is keyed by it.
        duration: seconds, as the container says (``None`` when it does not).
        owned: the file is an upload, to be removed with the video (samples are not).
        last_used: :func:`time.monotonic` of the last request that named it.
    """

    id: str
    name: str
    path: Path
    digest: str
    duration: float | None
    owned: bool
    last_used: float = field(default_factory=time.monotonic)


def clean_name(raw: str) -> str:
    """A label from a client's file name: its last path component, control characters removed,
    at most :data:`MAX_NAME` characters; ``video`` when nothing is left."""
    name = PureWindowsPath(raw).name  # splits on / and \ alike
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    return name[-MAX_NAME:] or "video"


def file_digest(path: Path) -> str:
    """sha256 (hex) of a file's bytes."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class UploadFolder:
    """The private folder and the videos registered in it.

    Args:
        idle_s: seconds after its last use at which :meth:`sweep` forgets a video.
    """

    def __init__(self, idle_s: float) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="r2-serve-"))
        self.idle_s = idle_s
        self._videos: dict[str, Video] = {}
        self._remove = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)  # at exit too

    async def receive(self, chunks: AsyncIterator[bytes], max_bytes: int) -> tuple[Path, str]:
        """Write a request body into a new server-named file; returns its path and sha256 (hex).

        Raises:
            ApiError: 413 past ``max_bytes`` bytes, 400 for an empty body (the file is removed).
        """
        path = self.path / f"{secrets.token_hex(16)}.upload"
        digest = hashlib.sha256()
        size = 0
        try:
            with path.open("xb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise ApiError(413, too_large(max_bytes))
                    digest.update(chunk)
                    out.write(chunk)
            if size == 0:
                raise ApiError(400, "The upload is empty (0 bytes): choose a video file.")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path, digest.hexdigest()

    def add(self, name: str, path: Path, digest: str, duration: float | None, owned: bool) -> Video:
        """Register a video under a new id."""
        video = Video(secrets.token_hex(16), name, path, digest, duration, owned)
        self._videos[video.id] = video
        return video

    def get(self, video_id: object) -> Video:
        """The video of ``video_id``, marked as used now.

        Raises:
            ApiError: 404 for an id that is not a live video's (malformed, unknown or forgotten).
        """
        video = self._videos.get(video_id) if isinstance(video_id, str) and _ID.fullmatch(video_id) else None
        if video is None:
            raise ApiError(404, "Unknown video id (videos left idle are forgotten): upload the video again.")
        video.last_used = time.monotonic()
        return video

    def sweep(self, now: float | None = None) -> list[str]:
        """Forget the videos unused for more than ``idle_s`` seconds and remove their uploads;
        returns their ids."""
        now = time.monotonic() if now is None else now
        idle = [v for v in self._videos.values() if now - v.last_used > self.idle_s]
        for video in idle:
            del self._videos[video.id]
            if video.owned:
                video.path.unlink(missing_ok=True)
        return [v.id for v in idle]

    def close(self) -> None:
        """Forget every video and remove the folder with all uploads."""
        self._videos.clear()
        self._remove()

