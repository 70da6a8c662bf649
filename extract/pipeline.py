"""The pipelined video -> tokens -> store loop of one process.

Three stages run at once and are joined by bounded queues, so memory stays flat however long
the videos are:

* ``workers`` decoding threads, each streaming one video at a time through
  :func:`extract.frames.sample_frames` and handing over chunks of frames;
* the calling thread, which packs frames of one or several videos into batches of
  ``batch_size`` and runs the image tower (PyAV and torch release the GIL, so decoding
  overlaps the model);
* one writer thread that stores each finished video with :meth:`FeatureStore.write_video`
  (atomic: a video is either complete in the store or absent).

A video that cannot be decoded is reported as a failure with its reason and the run goes on.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from extract.backbone import ClipBackbone
from extract.frames import preprocess, sample_frames
from shards.errors import VideoError
from shards.store import FeatureStore

CHUNK_FRAMES = 8
"""Frames a decoder hands over at once (the batch packer merges chunks of several videos)."""


@dataclass(frozen=True)
class VideoTask:
    """One video to extract: store key, file and sampling rate (frames per second)."""

    vid: str
    path: Path
    fps: float


@dataclass(frozen=True)
class VideoResult:
    """Outcome of one video: ``frames`` = T written, or ``error`` = why it was skipped."""

    vid: str
    frames: int = 0
    error: str | None = None


@dataclass(eq=False)
class _Piece:
    """Frames ``(n, S, S, 3)`` uint8 of task ``index``; ``last`` marks the end of that video."""

    index: int
    frames: np.ndarray | None
    last: bool
    error: str | None = None


@dataclass
class _Queued:
    """Frames ``(n, S, S, 3)`` uint8 of task ``index`` not yet run through the image tower."""

    index: int
    frames: np.ndarray


@dataclass
class _Progress:
    """Per-video state of the packer: encoded token blocks, chunks still queued, end seen."""

    tokens: list[np.ndarray] = field(default_factory=list)
    queued: int = 0
    ended: bool = False


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first; returns whether it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _decode_loop(
    tasks: Sequence[VideoTask], todo: queue.Queue, out: queue.Queue, size: int, stop: threading.Event
) -> None:
    """Decoder thread: take task indices from ``todo`` and emit their frames as :class:`_Piece` chunks."""
    while not stop.is_set():
        try:
            index = todo.get_nowait()
        except queue.Empty:
            return
        task = tasks[index]
        buf: list[np.ndarray] = []
        try:
            for frame in sample_frames(task.path, task.fps, size):
                buf.append(frame)
                if len(buf) == CHUNK_FRAMES:
                    if not _put(out, _Piece(index, np.stack(buf), False), stop):
                        return
                    buf = []
            piece = _Piece(index, np.stack(buf) if buf else None, True)
        except Exception as err:  # a bad file must not stop the run: report it as this video's failure
            reason = str(err) if isinstance(err, VideoError) else f"{task.path}: {type(err).__name__}: {err}"
            piece = _Piece(index, None, True, reason)
        if not _put(out, piece, stop):
            return


class _Writer:
    """One background thread that writes finished videos; errors resurface in the caller."""

    def __init__(self, store: FeatureStore, report: Callable[[VideoResult], None]) -> None:
        self.store, self.report = store, report
        self.inbox: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="extract-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.inbox.get()
            if item is None:
                return
            vid, tokens, fps = item
            if self.error is not None:
                continue
            try:
                self.store.write_video(vid, tokens, fps)
            except BaseException as err:
                self.error = err
                continue
            self.report(VideoResult(vid, int(tokens.shape[0])))

    def submit(self, vid: str, tokens: np.ndarray, fps: float) -> None:
        self.check()
        self.inbox.put((vid, tokens, fps))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Wait for queued writes, then re-raise a write error if one happened."""
        self.inbox.put(None)
        self.thread.join()
        self.check()


class _Packer:
    """Packs decoded chunks into full batches for the image tower and hands finished videos to the writer.

    A batch runs when ``batch_size`` frames are queued, or when no more frames can come (every
    video's last chunk arrived), so the model never sees needlessly small batches.
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        tasks: Sequence[VideoTask],
        batch_size: int,
        writer: _Writer,
        report: Callable[[VideoResult], None],
    ) -> None:
        self.backbone, self.tasks, self.batch_size = backbone, tasks, batch_size
        self.writer, self.report = writer, report
        self.state = {i: _Progress() for i in range(len(tasks))}
        self.pending: deque[_Queued] = deque()
        self.pending_frames = 0
        self.remaining = len(tasks)  # videos not finished yet
        self.open = len(tasks)  # videos whose last chunk has not arrived yet

    def receive(self, piece: _Piece) -> None:
        """Take one chunk from a decoder."""
        progress = self.state[piece.index]
        if piece.last:
            self.open -= 1
        if piece.error is not None:
            self.state.pop(piece.index)
            self.remaining -= 1
            self.pending_frames -= sum(len(p.frames) for p in self.pending if p.index == piece.index)
            kept = [p for p in self.pending if p.index != piece.index]
            self.pending.clear()
            self.pending.extend(kept)
            self.report(VideoResult(self.tasks[piece.index].vid, 0, piece.error))
            return
        if piece.frames is not None:
            self.pending.append(_Queued(piece.index, piece.frames))
            self.pending_frames += len(piece.frames)
            progress.queued += 1
        progress.ended = piece.last
        if progress.ended and progress.queued == 0:
            self._finish(piece.index)

    def encode(self) -> None:
        """Run the image tower on up to ``batch_size`` queued frames (oldest first)."""
        taken: list[tuple[int, np.ndarray, bool]] = []  # (task index, frames, whole piece consumed)
        count = 0
        while self.pending and count < self.batch_size:
            piece = self.pending[0]
            room = self.batch_size - count
            if len(piece.frames) <= room:
                self.pending.popleft()
                taken.append((piece.index, piece.frames, True))
                count += len(piece.frames)
            else:
                taken.append((piece.index, piece.frames[:room], False))
                piece.frames = piece.frames[room:]
                count += room
        self.pending_frames -= count
        frames = np.concatenate([f for _, f, _ in taken])
        encoded = self.backbone.encode_frames(preprocess(frames, self.backbone.device))
        tokens = encoded.to(torch.float16).cpu().numpy()
        start = 0
        for index, part, whole in taken:
            progress = self.state[index]
            progress.tokens.append(tokens[start : start + len(part)])
            start += len(part)
            if whole:
                progress.queued -= 1
                if progress.ended and progress.queued == 0:
                    self._finish(index)

    def _finish(self, index: int) -> None:
        progress = self.state.pop(index)
        self.remaining -= 1
        task = self.tasks[index]
        if not progress.tokens:
            self.report(
                VideoResult(task.vid, 0, f"{task.path}: no frames could be sampled at {task.fps:g} fps")
            )
            return
        self.writer.submit(task.vid, np.concatenate(progress.tokens), task.fps)


def extract_videos(
    backbone: ClipBackbone,
    store: FeatureStore,
    tasks: Sequence[VideoTask],
    *,
    batch_size: int = 32,
    workers: int = 2,
    on_result: Callable[[VideoResult], None] | None = None,
) -> list[VideoResult]:
    """Decode, encode and store ``tasks``; return one :class:`VideoResult` per task (completion order).

    Each video's tokens ``(T, k, P, C)`` are written as float16 with its task fps. Decoding
    failures (missing, truncated, corrupt, audio-only files, no frames) become results with an
    ``error``; store write errors are raised. ``on_result`` is called (from this or the writer
    thread, serialised) as soon as each video is finished.

    Args:
        batch_size: frames per image-tower forward pass (frames of several videos are packed).
        workers: decoding threads.
    """
    results: list[VideoResult] = []
    lock = threading.Lock()

    def report(result: VideoResult) -> None:
        with lock:
            results.append(result)
            if on_result is not None:
                on_result(result)

    if not tasks:
        return results
    stop = threading.Event()
    todo: queue.Queue = queue.Queue()
    for index in range(len(tasks)):
        todo.put(index)
    inbox: queue.Queue = queue.Queue(maxsize=max(4, 2 * workers + 2 * batch_size // CHUNK_FRAMES))
    decoders = [
        threading.Thread(
            target=_decode_loop,
            args=(tasks, todo, inbox, backbone.frame_size, stop),
            name=f"decode-{i}",
            daemon=True,
        )
        for i in range(max(1, min(workers, len(tasks))))
    ]
    for thread in decoders:
        thread.start()
    writer = _Writer(store, report)
    packer = _Packer(backbone, tasks, batch_size, writer, report)
    try:
        while packer.remaining:
            while packer.open and packer.pending_frames < batch_size:
                try:
                    piece = inbox.get(timeout=0.2)
                except queue.Empty:
                    if not any(t.is_alive() for t in decoders) and inbox.empty():
                        raise RuntimeError("decoder threads ended before every video was reported") from None
                    continue
                packer.receive(piece)
            if packer.pending_frames:
                packer.encode()
            elif packer.remaining:
                raise RuntimeError("videos left unfinished with no frames queued")
            writer.check()
    finally:
        stop.set()
        for thread in decoders:
            thread.join()
        writer.close()
    return results
