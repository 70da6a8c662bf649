"""The pipelined video -> tokens -> store loop of one process.

Three stages run at once and are joined by bounded queues, so memory stays flat however long
the videos are:

* ``workers`` decoding threads (default: one per usable core but one,
  :func:`extract.config.decode_workers`), each streaming one video at a time through
  :func:`extract.frames.sample_frames` (resized and normalised as the backbone's
  :attr:`~extract.backbone.BackboneInfo.preprocess` says, the manifest's ``preprocess``) and handing
  over chunks of frames;
* the calling thread, which packs frames of one or several videos into batches of
  ``batch_size`` and runs the image tower (PyAV and torch release the GIL, so decoding
  overlaps the model). On a GPU it never waits for a batch before starting the next: frames go
  in and tokens come back through pinned host buffers with asynchronous copies (the copy back on
  a side stream), and the tokens of batch ``i`` are taken back once batch ``i + 1`` is running
  (:data:`BATCHES_IN_FLIGHT`);
* one writer thread that stores each finished video with :meth:`FeatureStore.write_video`
  (atomic: a video is either complete in the store or absent).

A video that cannot be decoded is reported as a failure with its reason and the run goes on.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from extract.backbone import ClipBackbone
from extract.config import decode_workers, decoder_threads
from extract.frames import preprocess, sample_frames
from shards.backbones import Preprocess
from shards.errors import VideoError
from shards.store import FeatureStore

CHUNK_FRAMES = 8
"""Frames a decoder hands over at once (the batch packer merges chunks of several videos)."""
BATCHES_IN_FLIGHT = 1
"""Batches started on the image tower before the oldest one's tokens are taken back: with 1, a GPU
computes batch ``i + 1`` while the tokens of batch ``i`` are copied back and handed to the writer
(0: each batch is finished before the next starts). The tokens do not depend on it."""


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
    tasks: Sequence[VideoTask],
    todo: queue.Queue,
    out: queue.Queue,
    spec: Preprocess,
    threads: int,
    stop: threading.Event,
) -> None:
    """Decoder thread: take task indices from ``todo`` and emit their frames, made as ``spec`` says, as
    :class:`_Piece` chunks (``threads``: FFmpeg threads of its decoder)."""
    while not stop.is_set():
        try:
            index = todo.get_nowait()
        except queue.Empty:
            return
        task = tasks[index]
        buf: list[np.ndarray] = []
        try:
            for frame in sample_frames(task.path, task.fps, spec, threads):
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


class _Slot:
    """Pinned host buffers of one batch on a GPU: frames ``(B, S, S, 3)`` uint8 on their way in,
    tokens ``(B, k, P, C)`` float16 on their way back, and the event recorded after the copy back."""

    def __init__(self, backbone: ClipBackbone, batch_size: int) -> None:
        side = backbone.frame_size
        shape = (batch_size, backbone.layers, backbone.video_tokens, backbone.video_width)
        self.frames = torch.empty((batch_size, side, side, 3), dtype=torch.uint8, pin_memory=True)
        self.tokens = torch.empty(shape, dtype=torch.float16, pin_memory=True)
        self.done = torch.cuda.Event()


@dataclass
class PendingTokens:
    """Tokens of one started batch: ``tokens`` already on the host (CPU), or ``count`` rows of ``slot``
    once its event has passed (GPU)."""

    tokens: np.ndarray | None = None
    slot: _Slot | None = None
    count: int = 0

    def result(self) -> np.ndarray:
        """The batch's tokens ``(N, k, P, C)`` float16, in an array of their own (waits for a GPU)."""
        if self.tokens is not None:
            return self.tokens
        assert self.slot is not None
        self.slot.done.synchronize()
        return self.slot.tokens[: self.count].numpy().copy()


class ImageTower:
    """Runs the image tower on batches of frames and hands the tokens back on the host as float16.

    On the CPU a batch is computed when submitted. On a GPU :meth:`submit` only queues the work:
    the frames are copied into a pinned buffer and sent asynchronously, and the float16 tokens are
    copied back into another pinned buffer on a side stream, so the next batch computes meanwhile.
    ``depth + 1`` sets of buffers take turns: at most ``depth`` batches may be pending when one is
    submitted.
    """

    def __init__(self, backbone: ClipBackbone, batch_size: int, depth: int) -> None:
        self.backbone = backbone
        self.slots: list[_Slot] = []
        self.turn = 0
        if backbone.device.type == "cuda":
            self.stream = torch.cuda.Stream(backbone.device)
            self.slots = [_Slot(backbone, batch_size) for _ in range(depth + 1)]

    @torch.inference_mode()
    def submit(self, frames: np.ndarray) -> PendingTokens:
        """Start the image tower on ``frames`` ``(N, S, S, 3)`` uint8, ``N`` at most the batch size."""
        device = self.backbone.device
        if not self.slots:
            encoded = self.backbone.encode_frames(preprocess(frames, device, self.backbone.preprocess))
            return PendingTokens(tokens=encoded.to(torch.float16).cpu().numpy())
        slot = self.slots[self.turn]
        self.turn = (self.turn + 1) % len(self.slots)
        slot.done.synchronize()  # its previous batch has left both buffers
        count = len(frames)
        slot.frames[:count].numpy()[...] = frames
        images = preprocess(slot.frames[:count], device, self.backbone.preprocess)
        tokens = self.backbone.encode_frames(images).to(torch.float16)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.stream):
            slot.tokens[:count].copy_(tokens, non_blocking=True)
            slot.done.record(self.stream)
        tokens.record_stream(self.stream)  # not reused by the allocator before the copy has read it
        return PendingTokens(slot=slot, count=count)


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
    video's last chunk arrived), so the model never sees needlessly small batches. The tokens of a
    batch are taken back once :data:`BATCHES_IN_FLIGHT` later batches have started (or by
    :meth:`drain`); a video is finished when the tokens of all its frames are back.
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
        self.tower = ImageTower(backbone, batch_size, BATCHES_IN_FLIGHT)
        self.in_flight: deque[tuple[list[tuple[int, int, bool]], PendingTokens]] = deque()

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
        """Start the image tower on up to ``batch_size`` queued frames (oldest first), then take back
        the tokens of the batches beyond :data:`BATCHES_IN_FLIGHT`."""
        taken: list[tuple[int, int, bool]] = []  # (task index, frames, whole piece consumed)
        parts: list[np.ndarray] = []
        count = 0
        while self.pending and count < self.batch_size:
            piece = self.pending[0]
            room = self.batch_size - count
            if len(piece.frames) <= room:
                self.pending.popleft()
                taken.append((piece.index, len(piece.frames), True))
                parts.append(piece.frames)
                count += len(piece.frames)
            else:
                taken.append((piece.index, room, False))
                parts.append(piece.frames[:room])
                piece.frames = piece.frames[room:]
                count += room
        self.pending_frames -= count
        self.in_flight.append((taken, self.tower.submit(np.concatenate(parts))))
        while len(self.in_flight) > BATCHES_IN_FLIGHT:
            self._collect()

    def drain(self) -> None:
        """Take back the tokens of every batch started."""
        while self.in_flight:
            self._collect()

    def _collect(self) -> None:
        """Take back the tokens of the oldest batch started and finish the videos they complete."""
        taken, pending = self.in_flight.popleft()
        tokens = pending.result()
        start = 0
        for index, count, whole in taken:
            progress = self.state.get(index)
            start += count
            if progress is None:  # the video failed to decode after these frames were sent
                continue
            progress.tokens.append(tokens[start - count : start])
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
    workers: int | None = None,
    on_result: Callable[[VideoResult], None] | None = None,
) -> list[VideoResult]:
    """Decode, encode and store ``tasks``; return one :class:`VideoResult` per task (completion order).

    Each video's tokens ``(T, k, P, C)`` are handed to the store as float16 with its task fps (the
    store keeps them in its manifest's dtype: float16, or int8). Decoding failures (missing,
    truncated, corrupt, audio-only files, no frames) become results with an ``error``; store write
    errors are raised. ``on_result`` is called (from this or the writer thread, serialised) as soon
    as each video is finished.

    Args:
        batch_size: frames per image-tower forward pass (frames of several videos are packed).
        workers: decoding threads; ``None``: one per usable core but one, at most
            :data:`extract.config.MAX_DECODE_WORKERS` (:func:`extract.config.decode_workers`). Each
            decoder's FFmpeg gets its share of the cores (:func:`extract.config.decoder_threads`).
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
    count = max(1, min(decode_workers(workers), len(tasks)))
    threads = decoder_threads(count)
    stop = threading.Event()
    todo: queue.Queue = queue.Queue()
    for index in range(len(tasks)):
        todo.put(index)
    inbox: queue.Queue = queue.Queue(maxsize=max(4, 2 * count + 2 * batch_size // CHUNK_FRAMES))
    decoders = [
        threading.Thread(
            target=_decode_loop,
            args=(tasks, todo, inbox, backbone.preprocess, threads, stop),
            name=f"decode-{i}",
            daemon=True,
        )
        for i in range(count)
    ]
    writer = _Writer(store, report)
    on_gpu = backbone.device.type == "cuda"
    try:
        with torch.cuda.device(backbone.device) if on_gpu else contextlib.nullcontext():
            packer = _Packer(backbone, tasks, batch_size, writer, report)
            for thread in decoders:
                thread.start()
            _pack_all(packer, inbox, decoders)
    finally:
        stop.set()
        for thread in decoders:
            if thread.ident is not None:
                thread.join()
        writer.close()
    return results


def _pack_all(packer: _Packer, inbox: queue.Queue, decoders: list[threading.Thread]) -> None:
    """The calling thread's loop: take decoded chunks, run full batches, until every video is reported."""
    while packer.remaining:
        while packer.open and packer.pending_frames < packer.batch_size:
            try:
                piece = inbox.get(timeout=0.2)
            except queue.Empty:
                if not any(t.is_alive() for t in decoders) and inbox.empty():
                    raise RuntimeError("decoder threads ended before every video was reported") from None
                continue
            packer.receive(piece)
        if packer.pending_frames:
            packer.encode()
        elif packer.in_flight:
            packer.drain()
        elif packer.remaining:
            raise RuntimeError("videos left unfinished with no frames queued")
        packer.writer.check()
