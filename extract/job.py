"""One extraction run: annotations + videos -> one feature store, resumable.

Steps: parse the annotation files (all splits), find each video file, open or create the store
(refused when its manifest — backbone, weights checksum, fps, layers — differs), extract every
video not yet complete (in-process, or fanned out over dask workers), encode every query not yet
stored, merge the annotations of the videos in the store, and list the skipped videos with their
reasons in ``<store>/failures.jsonl``.

A killed run loses nothing that was marked done: each video is committed atomically by the
store, so re-running the same command skips finished videos and redoes the rest.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from extract.backbone import PRECISIONS, BackboneInfo, ClipBackbone, load_backbone
from extract.config import ExtractConfig
from extract.pipeline import VideoResult, VideoTask, extract_videos
from shards.annotations import load_many
from shards.atomic import atomic_path, writes_to
from shards.backbones import get_backbone
from shards.cluster import absolute
from shards.datasets import DatasetSpec, get_dataset, video_filename_stem
from shards.errors import ConfigError, VideoError
from shards.schema import Query
from shards.store import FeatureStore, create_store

FAILURES_FILE = "failures.jsonl"
"""Name, inside the store directory, of the list of videos the last run skipped."""
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
        self.backbone = backbone or load_backbone(
            cfg.arch, cfg.pretrained, cfg.layers, cfg.device, cfg.seed, cfg.cache_dir, cfg.precision
        )
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
        queries_written: query token sets written by this run.
        annotations: annotation records now in the store (videos present in the store only).
        failures: video id -> reason, for every video this run could not extract.
        failures_file: ``<store>/failures.jsonl`` when there were failures, else ``None``.
        seconds: wall time of the run.
        random_weights: the backbone had random weights (pipeline test only).
    """

    store: Path
    videos: int
    extracted: int = 0
    already_done: int = 0
    frames: int = 0
    queries_written: int = 0
    annotations: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    failures_file: Path | None = None
    seconds: float = 0.0
    random_weights: bool = False

    @property
    def exit_code(self) -> int:
        """0 when every video is in the store, 1 when some were skipped (see ``failures``)."""
        return 1 if self.failures else 0


def find_video(folder: Path, stem: str, extensions: Sequence[str]) -> Path | None:
    """The first existing ``folder/<stem><ext>`` over ``extensions`` (lower, then upper case)."""
    for ext in extensions:
        for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def limit_queries(queries: list[Query], limit: int | None) -> list[Query]:
    """Queries of the first ``limit`` videos (in annotation order); all when ``limit`` is ``None``."""
    if limit is None:
        return queries
    keep: list[str] = []
    for q in queries:
        if q.vid not in keep:
            if len(keep) == limit:
                continue
            keep.append(q.vid)
    chosen = set(keep)
    return [q for q in queries if q.vid in chosen]


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
            failures[q.vid] = f"missing file: no {stem}{{{','.join(cfg.extensions)}}} in {cfg.videos}"
        elif fps is None or not fps > 0:
            failures[q.vid] = f"no sampling rate: the annotation gives no fps for video {q.vid!r}; pass --fps"
        else:
            tasks.append(VideoTask(q.vid, path, float(fps)))
    return tasks, failures


def _check_config(cfg: ExtractConfig) -> None:
    get_backbone(cfg.arch)  # an unknown backbone fails before a worker starts or a video is read
    if not cfg.videos.is_dir():
        raise VideoError(f"videos folder {cfg.videos} does not exist (pass --videos DIR)")
    for name in ("batch_size", "query_batch_size", "workers", "layers"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision must be {' or '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.fps is not None and not cfg.fps > 0:
        raise ConfigError(f"fps must be positive or 'auto', got {cfg.fps}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"limit must be at least 1, got {cfg.limit}")


def _make_runner(cfg: ExtractConfig, backbone: ClipBackbone | None) -> Runner:
    """A dask runner for ``--scheduler`` or several visible GPUs, else the in-process runner."""
    many_gpus = cfg.device in ("auto", "cuda") and torch.cuda.device_count() > 1
    if backbone is None and (cfg.scheduler is not None or (many_gpus and cfg.dask_workers != 1)):
        from extract.fanout import DaskRunner

        return DaskRunner(cfg)
    return LocalRunner(cfg, backbone)


def write_query_tokens(runner: Runner, store: FeatureStore, queries: Sequence[Query], batch_size: int) -> int:
    """Encode and store the tokens of every query not yet in ``store``; returns how many were written.

    Sentences are batched by length (less padding); the store gets one part per
    :data:`QUERY_WRITE_ROWS` queries, so a killed run keeps what was written.
    """
    have = set(store.query_ids())
    todo: dict[int | str, str] = {}
    for q in queries:
        if q.qid not in have and q.qid not in todo:
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


def _write_failures(store_dir: Path, failures: dict[str, str], paths: dict[str, Path]) -> Path | None:
    """Replace ``<store>/failures.jsonl`` (atomically) with this run's failures; remove it when none.

    The same failures as the file lists already are not written again (a read-only store resumes).
    """
    target = store_dir / FAILURES_FILE
    if not failures:
        if target.is_file():  # unlink fails on a read-only store even when there is nothing to remove
            target.unlink(missing_ok=True)
        return None
    text = "".join(
        json.dumps({"vid": vid, "path": str(paths[vid]) if vid in paths else None, "reason": reason}) + "\n"
        for vid, reason in failures.items()
    )
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        with atomic_path(target) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return target


def run_extraction(cfg: ExtractConfig, backbone: ClipBackbone | None = None) -> ExtractSummary:
    """Run (or resume) the extraction described by ``cfg``; see the module docstring.

    ``backbone``: an already loaded backbone to use in this process instead of building one
    from ``cfg.arch`` / ``cfg.pretrained`` / ``cfg.layers`` / ``cfg.device`` (no fan-out then).

    Raises:
        R2Error subclasses for user errors: unknown dataset or backbone, bad annotation file, missing
        videos folder, unusable weights, a store made with other settings. Per-video problems do not
        raise; they are listed in the summary and in ``<store>/failures.jsonl``.
        OSError naming the store (``cfg.out``) when the disk is full or the store is read-only
        (:func:`shards.atomic.writes_to`); what was written stays consistent, and a re-run resumes.
    """
    cfg = absolute_paths(cfg)
    with writes_to(cfg.out):
        return _extract(cfg, backbone)


def absolute_paths(cfg: ExtractConfig) -> ExtractConfig:
    """``cfg`` with every path absolute (videos, annotations, store, a weights file, the weights cache):
    dask workers may run in another folder or on another host, so relative paths are never sent."""
    weights_file = cfg.pretrained not in ("openai", "random") and not cfg.pretrained.startswith("random:")
    return replace(
        cfg,
        videos=absolute(cfg.videos),
        annotations=[absolute(a) for a in cfg.annotations],
        out=absolute(cfg.out),
        pretrained=str(absolute(cfg.pretrained)) if weights_file else cfg.pretrained,
        cache_dir=None if cfg.cache_dir is None else str(absolute(cfg.cache_dir)),
    )


def _extract(cfg: ExtractConfig, backbone: ClipBackbone | None) -> ExtractSummary:
    """The body of :func:`run_extraction`."""
    started = time.monotonic()
    spec = get_dataset(cfg.dataset)
    _check_config(cfg)
    queries = limit_queries(load_many(spec.name, cfg.annotations), cfg.limit)
    tasks, failures = plan_videos(spec, queries, cfg)
    summary = ExtractSummary(store=cfg.out, videos=len(tasks) + len(failures))
    runner = _make_runner(cfg, backbone)
    try:
        info = runner.info
        summary.random_weights = info.pretrained.startswith("random:")
        store = create_store(cfg.out, info.manifest(spec.name, cfg.fps if cfg.fps is not None else spec.fps))
        store.annotations()  # unreadable stored annotations stop the run now, not after the extraction
        todo = [t for t in tasks if not store.has_video(t.vid)]
        summary.already_done = len(tasks) - len(todo)
        bar = tqdm(
            total=len(todo),
            unit="video",
            desc="extract",
            file=sys.stderr,
            disable=None if cfg.progress else True,
            dynamic_ncols=True,
        )
        clock = time.monotonic()

        def on_result(result: VideoResult) -> None:
            if result.error is None:
                summary.extracted += 1
                summary.frames += result.frames
            else:
                failures[result.vid] = result.error
            rate = summary.frames / max(time.monotonic() - clock, 1e-9)
            bar.set_postfix_str(f"{rate:.1f} frames/s, {len(failures)} failed", refresh=False)
            bar.update(1)

        with bar:
            runner.extract(store, todo, on_result)
        summary.queries_written = write_query_tokens(runner, store, queries, cfg.query_batch_size)
    finally:
        runner.close()
    present = set(store.video_ids())
    ours = [q for q in queries if q.vid in present]
    stored = {q.qid: q for q in store.annotations()}
    if any(stored.get(q.qid) != q for q in ours):  # no write when nothing changed: a read-only store resumes
        store.write_annotations(ours)
    summary.annotations = sum(1 for q in store.annotations() if q.vid in present)
    summary.failures = failures
    summary.failures_file = _write_failures(cfg.out, failures, {t.vid: t.path for t in tasks})
    summary.seconds = time.monotonic() - started
    return summary
