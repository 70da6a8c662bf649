"""Encoded videos by content: the model thread, encoding jobs with progress, a cache bounded in bytes.

Every model call (CLIP over a video's frames, a sentence's prediction) runs on one worker thread,
so calls never interleave on the model and the event loop stays free to answer (progress, health,
the video file). A video is encoded once per content: jobs and cache are keyed by the sha256 of the
file, and an upload of the same bytes reuses the tokens. The cache keeps the most recently used
encodings up to ``max_bytes`` of tokens; one evicted is encoded again when asked for.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from r2.serve.errors import too_long
from shards.errors import VideoError

if TYPE_CHECKING:
    from r2.predict import EncodedVideo, Predictor

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where the encoding of one content stands (written by the model thread, read by requests).

    Attributes:
        done: clips encoded so far.
        total: clips the video's duration promises (``None`` when unknown).
        finished: the job has ended (tokens cached, or ``error`` set).
        error: one sentence when the encoding failed (a truncated or undecodable video).
    """

    done: int = 0
    total: int | None = None
    finished: bool = False
    error: str | None = None


class Encodings:
    """Encoding jobs and the cache of their results.

    Args:
        predictor: the model.
        max_bytes: most bytes of tokens kept in the cache.
        max_seconds: most seconds of video encoded (stops a container that understates its length).
    """

    def __init__(self, predictor: Predictor, max_bytes: int, max_seconds: float) -> None:
        self.predictor = predictor
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.progress: dict[str, Progress] = {}
        self._model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="r2-model")
        self._cache: OrderedDict[str, EncodedVideo] = OrderedDict()
        self._jobs: dict[str, asyncio.Future[EncodedVideo]] = {}

    @property
    def cached_bytes(self) -> int:
        """Bytes of tokens in the cache."""
        return sum(video.tokens.nbytes for video in self._cache.values())

    def cached(self, digest: str) -> bool:
        """Whether the tokens of this content are in the cache."""
        return digest in self._cache

    async def run(self, call: Callable[[], T]) -> T:
        """``call()`` on the model thread, after the model calls queued before it."""
        return await asyncio.get_running_loop().run_in_executor(self._model, call)

    def start(self, digest: str, path: Path, label: str, total: int | None) -> Progress:
        """Start encoding ``path`` unless its content is cached, under way or failed; its progress.

        ``label`` replaces the server's path in error messages; ``total`` is the clips expected.
        """
        if digest not in self._cache and digest not in self._jobs and not self._failed(digest):
            progress = self.progress[digest] = Progress(total=total)
            job = asyncio.get_running_loop().run_in_executor(
                self._model, self._encode, path, label, progress
            )
            self._jobs[digest] = job
            job.add_done_callback(partial(self._finished, digest))
        return self.progress[digest]

    async def encoded(self, digest: str, path: Path, label: str) -> EncodedVideo:
        """The encoded video: from the cache, from the job under way, or from a new job.

        Raises:
            VideoError: the video cannot be encoded (the message names ``label``).
        """
        video = self._cache.get(digest)
        if video is not None:
            self._cache.move_to_end(digest)
            return video
        self.start(digest, path, label, None)
        failed = self._failed(digest)
        if failed is not None:
            raise VideoError(failed)
        return await asyncio.shield(self._jobs[digest])

    def close(self) -> None:
        """Cancel the queued model calls and let the running one end on its own."""
        self._model.shutdown(wait=False, cancel_futures=True)

    def _failed(self, digest: str) -> str | None:
        progress = self.progress.get(digest)
        return progress.error if progress is not None else None

    def _encode(self, path: Path, label: str, progress: Progress) -> EncodedVideo:
        """Runs on the model thread: CLIP over the video, reporting into ``progress``."""
        fps = self.predictor.fps
        most = math.floor(self.max_seconds * fps) + 1

        def report(done: int, expected: int | None) -> None:
            if done > most:
                raise VideoError(too_long(label, self.max_seconds, None))
            progress.done = done
            progress.total = expected if expected is not None else progress.total

        try:
            return self.predictor.encode_video(path, progress=report)
        except VideoError as err:
            raise VideoError(str(err).replace(str(path), label)) from None

    def _finished(self, digest: str, job: asyncio.Future[EncodedVideo]) -> None:
        """Runs on the event loop when a job ends: cache its tokens, or record its error."""
        del self._jobs[digest]
        progress = self.progress[digest]
        progress.finished = True
        if job.cancelled():
            progress.error = "The server stopped while encoding this video."
            return
        err = job.exception()
        if err is None:
            self._put(digest, job.result())
            progress.done = len(job.result().tokens)
            progress.total = progress.done
        elif isinstance(err, VideoError):
            progress.error = str(err)
        else:
            log.error("encoding failed", exc_info=err)
            progress.error = f"Encoding failed on the server ({type(err).__name__}: {err})."

    def _put(self, digest: str, video: EncodedVideo) -> None:
        """Cache ``video`` and evict the least recently used encodings past ``max_bytes`` (one larger
        than the whole cache is not kept)."""
        if video.tokens.nbytes > self.max_bytes:
            return
        self._cache[digest] = video
        while self.cached_bytes > self.max_bytes:
            self._cache.popitem(last=False)
