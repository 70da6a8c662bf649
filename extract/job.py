"""One extraction run: annotations + videos -> one feature store, resumable.

Steps: parse the annotation files (all splits; :func:`extract.config.read_inputs`), find each video
file, open or create the store (refused when its manifest — backbone, weights checksum, fps,
layers, preprocessing, token pooling, dtype — differs), extract every video not yet complete
(in-process, or fanned out over dask workers), encode the queries of the videos in the store that
have no tokens yet (or whose sentence changed), merge their annotations, list the skipped videos
with their reasons in ``<store>/failures.jsonl``, and the videos whose length disagrees with their
annotated duration (:func:`shards.verify.duration_mismatches`, as ``r2 shards verify`` reports
them) in ``<store>/warnings.jsonl``.

Progress goes to stderr: a bar on a terminal, else (batch jobs) an ``extract: 120/800 videos, ...``
log line every ``progress_interval`` seconds.

A killed run loses nothing that was marked done: each video is committed atomically by the
store, so re-running the same command skips finished videos and redoes the rest. A run stopped by
Ctrl-C (or SIGTERM, made one by :func:`shards.cliutil.sigterm_as_interrupt`) in this process
finishes first: the videos being written are committed, and the queries and annotations of the
videos in the store are written, so the store verifies clean; then the ``KeyboardInterrupt`` goes on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from extract.backbone import PRECISIONS, BackboneInfo, ClipBackbone, load_backbone
from extract.config import ExtractConfig, ExtractInputs, check_options, find_video, read_inputs
from extract.pipeline import VideoResult, VideoTask, extract_videos
from shards.atomic import atomic_path, writes_to
from shards.cliutil import duration_text
from shards.cluster import absolute
from shards.datasets import DatasetSpec, video_filename_stem
from shards.errors import ConfigError
from shards.schema import Query
from shards.store import FeatureStore, create_store
from shards.verify import DurationMismatch, duration_mismatches

logger = logging.getLogger(__name__)

FAILURES_FILE = "failures.jsonl"
"""Name, inside the store directory, of the list of videos the last run skipped."""
WARNINGS_FILE = "warnings.jsonl"
"""Name, inside the store directory, of the list of videos the last run found at odds with their
annotations (``duration-mismatch``)."""
QUERY_WRITE_ROWS = 1024
"""Queries collected before one :meth:`FeatureStore.write_queries` call (one store part)."""


class Runner(Protocol):
    """Where the backbone runs: this process (:class:`LocalRunner`) or dask workers (``extract.fanout``)."""

    info: BackboneInfo

    def extract(
        self, store: FeatureStore, tasks: Sequence[VideoTask], on_result: Callable[[VideoResult], None]
    ) -> None:
        """Extract ``tasks`` into ``store``, calling ``on_result(VideoResult)`` per finished video."""

    def encode_texts(self, batches: Sequence[list[str]]) -> Iterator[tuple[int, list[np.ndarray]]]:
        """Yield ``(batch index, [(L_i, k, Cq) float16 ...])`` for each batch of sentences, any order."""

    def close(self) -> None:
        """Release the backbone / cluster."""


class LocalRunner:
    """Runs the backbone in this process with the pipelined loop of :mod:`extract.pipeline`."""

    def __init__(self, cfg: ExtractConfig, backbone: ClipBackbone | None = None) -> None:
        self.cfg = cfg
        self.backbone = backbone or load_backbone(**cfg.backbone_args())
        self.info = self.backbone.info()

    def extract(
        self, store: FeatureStore, tasks: Sequence[VideoTask], on_result: Callable[[VideoResult], None]
    ) -> None:
        extract_videos(
            self.backbone,
            store,
            tasks,
            batch_size=self.cfg.batch_size,
            workers=self.cfg.workers,
            on_result=on_result,
        )

    def encode_texts(self, batches: Sequence[list[str]]) -> Iterator[tuple[int, list[np.ndarray]]]:
        for index, texts in enumerate(batches):
            yield index, [t.to(torch.float16).cpu().numpy() for t in self.backbone.encode_texts(texts)]

    def close(self) -> None:
        del self.backbone


@dataclass
class ExtractSummary:
    """What a run did.

    Attributes:
        store: store directory.
        videos: videos named by the (limited) annotations.
        extracted: videos extracted by this run.
        already_done: videos skipped because the store had them complete.
        frames: frames (clips) extracted by this run.
        queries_written: queries added to the store by this run: annotated queries of videos in the
            store that it did not list before (their tokens are written with them).
        annotations: annotation records now in the store (videos present in the store only).
        failures: video id -> reason, for every video this run could not extract.
        failures_file: ``<store>/failures.jsonl`` when there were failures, else ``None``.
        mismatches: videos of the annotations, in the store, whose length ``T / fps`` differs from
            their annotated duration by more than :data:`shards.verify.MAX_CLIP_DIFF` clips.
        warnings_file: ``<store>/warnings.jsonl`` when there were mismatches, else ``None``.
        seconds: wall time of the run.
        random_weights: the backbone had random weights (pipeline test only).

    A run stopped by Ctrl-C or SIGTERM leaves in the summary it was given what it did until then.
    """

    store: Path
    videos: int = 0
    extracted: int = 0
    already_done: int = 0
    frames: int = 0
    queries_written: int = 0
    annotations: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    failures_file: Path | None = None
    mismatches: list[DurationMismatch] = field(default_factory=list)
    warnings_file: Path | None = None
    seconds: float = 0.0
    random_weights: bool = False

    @property
    def exit_code(self) -> int:
        """0 when every video is in the store, 1 when some were skipped (see ``failures``)."""
        return 1 if self.failures else 0


def plan_videos(
    spec: DatasetSpec, queries: list[Query], cfg: ExtractConfig
) -> tuple[list[VideoTask], dict[str, str]]:
    """One task per annotated video (annotation order) and the failures known up front (missing files)."""
    tasks: list[VideoTask] = []
    failures: dict[str, str] = {}
    seen: set[str] = set()
    for q in queries:
        if q.vid in seen:
            continue
        seen.add(q.vid)
        fps = cfg.fps if cfg.fps is not None else spec.fps if spec.fps is not None else q.fps
        stem = video_filename_stem(spec, q.vid)
        path = find_video(cfg.videos, stem, cfg.extensions)
        if path is None:
            failures[q.vid] = missing_video_reason(spec, q.vid, cfg.videos, cfg.extensions)
        elif fps is None or not fps > 0:
            failures[q.vid] = f"no sampling rate: the annotation gives no fps for video {q.vid!r}; pass --fps"
        else:
            tasks.append(VideoTask(q.vid, path, float(fps)))
    return tasks, failures


def missing_video_reason(spec: DatasetSpec, vid: str, folder: Path, extensions: Sequence[str]) -> str:
    """Why video ``vid`` was not found in ``folder``, with a hint when a file is there under the name the
    dataset's suffix would not give (TACoS: ``<vid>.avi`` where ``<vid>-cam-002.avi`` is expected)."""
    stem = video_filename_stem(spec, vid)
    reason = f"missing file: no {stem}{{{','.join(extensions)}}} in {folder}"
    found = find_video(folder, vid, extensions) if spec.video_suffix else None
    if found is None:
        return reason
    return (
        f"{reason}; found {found.name}: {spec.title} videos are named <vid>{spec.video_suffix}.<ext>; "
        f"rename it to {stem}{found.suffix}"
    )


def _check_precision(cfg: ExtractConfig) -> None:
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision must be {' or '.join(PRECISIONS)}, got {cfg.precision!r}")


def _make_runner(cfg: ExtractConfig, backbone: ClipBackbone | None) -> Runner:
    """A dask runner for ``--scheduler`` or several visible GPUs, else the in-process runner."""
    many_gpus = cfg.device in ("auto", "cuda") and torch.cuda.device_count() > 1
    if backbone is None and (cfg.scheduler is not None or (many_gpus and cfg.dask_workers != 1)):
        from extract.fanout import DaskRunner

        return DaskRunner(cfg)
    return LocalRunner(cfg, backbone)


def write_query_tokens(
    runner: Runner,
    store: FeatureStore,
    queries: Sequence[Query],
    batch_size: int,
    redo: Collection[int | str] = (),
) -> int:
    """Encode and store the tokens of every query not yet in ``store``, and of those in ``redo`` (their
    sentence changed); returns how many were written.

    Sentences are batched by length (less padding); the store gets one part per
    :data:`QUERY_WRITE_ROWS` queries, so a killed run keeps what was written.
    """
    have = set(store.query_ids())
    todo: dict[int | str, str] = {}
    for q in queries:
        if (q.qid not in have or q.qid in redo) and q.qid not in todo:
            todo[q.qid] = q.text
    items = sorted(todo.items(), key=lambda item: len(item[1]))
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    ids: list[int | str] = []
    tokens: list[np.ndarray] = []
    written = 0
    for index, arrays in runner.encode_texts([[text for _, text in batch] for batch in batches]):
        ids += [qid for qid, _ in batches[index]]
        tokens += arrays
        if len(ids) >= QUERY_WRITE_ROWS:
            store.write_queries(ids, tokens)
            written += len(ids)
            ids, tokens = [], []
    if ids:
        store.write_queries(ids, tokens)
        written += len(ids)
    return written


def _write_list(target: Path, rows: list[dict[str, Any]]) -> Path | None:
    """Replace the JSON Lines file ``target`` (atomically) with ``rows``; remove it when there are none.

    A file that already holds these rows is not written again (a read-only store resumes).
    """
    if not rows:
        if target.is_file():  # unlink fails on a read-only store even when there is nothing to remove
            target.unlink(missing_ok=True)
        return None
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        with atomic_path(target) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return target


def _failure_rows(failures: dict[str, str], paths: dict[str, Path]) -> list[dict[str, Any]]:
    """``failures.jsonl`` lines: ``{"vid", "path" (or null), "reason"}``."""
    return [
        {"vid": vid, "path": str(paths[vid]) if vid in paths else None, "reason": reason}
        for vid, reason in failures.items()
    ]


def _warning_rows(mismatches: list[DurationMismatch], paths: dict[str, Path]) -> list[dict[str, Any]]:
    """``warnings.jsonl`` lines: ``{"vid", "path", "kind": "duration-mismatch", "annotated_s", "video_s",
    "clips", "fps", "detail"}`` (seconds rounded to 0.01 s)."""
    return [
        {
            "vid": m.vid,
            "path": str(paths[m.vid]) if m.vid in paths else None,
            "kind": "duration-mismatch",
            "annotated_s": round(m.duration, 2),
            "video_s": round(m.seconds, 2),
            "clips": m.clips,
            "fps": m.fps,
            "detail": m.detail,
        }
        for m in mismatches
    ]


class ProgressLines:
    """The progress of an extraction as log lines, for batch jobs (stderr no terminal, so no bar):
    ``extract: 120/800 videos, 5400 frames, 38.2 frames/s, ETA 12 min``, at most one every ``interval``
    seconds (0: one per video)."""

    def __init__(self, total: int, interval: float) -> None:
        self.total, self.interval = total, interval
        self.started = self.last = time.monotonic()

    def update(self, done: int, frames: int, failed: int) -> None:
        """Log a line if ``interval`` seconds passed since the last one (``done`` videos of ``total``)."""
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        eta = duration_text(elapsed / done * (self.total - done)) if done else "unknown"
        failed_text = f", {failed} failed" if failed else ""
        logger.info(
            f"extract: {done}/{self.total} videos{failed_text}, {frames} frames, "
            f"{frames / elapsed:.1f} frames/s, ETA {eta}"
        )


def run_extraction(
    cfg: ExtractConfig,
    backbone: ClipBackbone | None = None,
    inputs: ExtractInputs | None = None,
    summary: ExtractSummary | None = None,
) -> ExtractSummary:
    """Run (or resume) the extraction described by ``cfg``; see the module docstring.

    ``backbone``: an already loaded backbone to use in this process instead of building one
    from ``cfg.arch`` / ``cfg.pretrained`` / ``cfg.layers`` / ``cfg.device`` / ``cfg.token_pool`` (no
    fan-out then).
    ``inputs``: the annotations already read by :func:`extract.config.read_inputs` (read here when
    ``None``). ``summary``: filled in as the run goes, so that after a ``KeyboardInterrupt`` it tells
    what was done (a new one when ``None``); it is returned.

    Raises:
        R2Error subclasses for user errors: unknown dataset or backbone, bad annotation file, missing
        videos folder, unusable weights, a store made with other settings. Per-video problems do not
        raise; they are listed in the summary and in ``<store>/failures.jsonl``.
        OSError naming the store (``cfg.out``) when the disk is full or the store is read-only
        (:func:`shards.atomic.writes_to`); what was written stays consistent, and a re-run resumes.
        KeyboardInterrupt (Ctrl-C, or SIGTERM under :func:`shards.cliutil.sigterm_as_interrupt`), once
        the store is finished (module docstring).
    """
    cfg = absolute_paths(cfg)
    summary = summary if summary is not None else ExtractSummary(store=cfg.out)
    summary.store = cfg.out
    with writes_to(cfg.out):
        return _extract(cfg, backbone, inputs, summary)


def absolute_paths(cfg: ExtractConfig) -> ExtractConfig:
    """``cfg`` with the paths workers use absolute (videos, store, a weights file, the weights cache):
    dask workers may run in another folder or on another host, so relative paths are never sent."""
    random = cfg.pretrained == "random" or cfg.pretrained.startswith("random:")
    path_like = (
        "/" in cfg.pretrained or os.sep in cfg.pretrained or Path(cfg.pretrained).expanduser().is_file()
    )
    weights_file = path_like and not random  # else a tag of open_clip's (openai, webli ...)
    return replace(
        cfg,
        videos=absolute(cfg.videos),
        out=absolute(cfg.out),
        pretrained=str(absolute(cfg.pretrained)) if weights_file else cfg.pretrained,
        cache_dir=None if cfg.cache_dir is None else str(absolute(cfg.cache_dir)),
    )


def _extract(
    cfg: ExtractConfig, backbone: ClipBackbone | None, inputs: ExtractInputs | None, summary: ExtractSummary
) -> ExtractSummary:
    """The body of :func:`run_extraction`."""
    started = time.monotonic()
    spec = check_options(cfg)
    _check_precision(cfg)
    queries = (inputs or read_inputs(cfg)).queries
    tasks, summary.failures = plan_videos(spec, queries, cfg)
    summary.videos = len(tasks) + len(summary.failures)
    stopped: KeyboardInterrupt | None = None
    runner = _make_runner(cfg, backbone)
    try:
        info = runner.info
        summary.random_weights = info.pretrained.startswith("random:")
        fps = cfg.fps if cfg.fps is not None else spec.fps
        store = create_store(cfg.out, info.manifest(spec.name, fps, dtype=cfg.dtype))
        stored = {q.qid: q for q in store.annotations()}  # unreadable ones stop the run now, not at its end
        todo = [t for t in tasks if not store.has_video(t.vid)]
        summary.already_done = len(tasks) - len(todo)
        try:
            _extract_videos(runner, store, todo, cfg, summary)
        except KeyboardInterrupt as err:
            if not isinstance(runner, LocalRunner):  # dask workers would finish their running videos first
                raise
            stopped = err
        present = set(store.video_ids())
        ours = [q for q in queries if q.vid in present]
        changed = {q.qid for q in ours if q.qid in stored and stored[q.qid].text != q.text}
        write_query_tokens(runner, store, ours, cfg.query_batch_size, redo=changed)
    finally:
        runner.close()
    if any(stored.get(q.qid) != q for q in ours):  # no write when nothing changed: a read-only store resumes
        store.write_annotations(ours)
    summary.queries_written = sum(1 for q in ours if q.qid not in stored)
    summary.annotations = sum(1 for q in store.annotations() if q.vid in present)
    if stopped is not None:
        raise stopped
    paths = {t.vid: t.path for t in tasks}
    summary.failures_file = _write_list(cfg.out / FAILURES_FILE, _failure_rows(summary.failures, paths))
    summary.mismatches = duration_mismatches(store, ours)
    summary.warnings_file = _write_list(cfg.out / WARNINGS_FILE, _warning_rows(summary.mismatches, paths))
    summary.seconds = time.monotonic() - started
    return summary


def _extract_videos(
    runner: Runner, store: FeatureStore, todo: list[VideoTask], cfg: ExtractConfig, summary: ExtractSummary
) -> None:
    """Extract ``todo`` into ``store``, counting in ``summary``; show the progress (module docstring)."""
    failures = summary.failures
    bar = tqdm(
        total=len(todo),
        unit="video",
        desc="extract",
        file=sys.stderr,
        disable=None if cfg.progress else True,
        dynamic_ncols=True,
    )
    batch_job = cfg.progress and not sys.stderr.isatty()
    lines = ProgressLines(len(todo), cfg.progress_interval) if batch_job else None
    clock = time.monotonic()
    failed = 0

    def on_result(result: VideoResult) -> None:
        nonlocal failed
        if result.error is None:
            summary.extracted += 1
            summary.frames += result.frames
        else:
            failures[result.vid] = result.error
            failed += 1
        rate = summary.frames / max(time.monotonic() - clock, 1e-9)
        bar.set_postfix_str(f"{rate:.1f} frames/s, {len(failures)} failed", refresh=False)
        bar.update(1)
        if lines is not None:
            lines.update(summary.extracted + failed, summary.frames, failed)

    with bar:
        runner.extract(store, todo, on_result)
