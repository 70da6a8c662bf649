"""Integrity check of a feature store (``r2 shards verify``).

Finds: leftover staging data of interrupted writes, videos or query parts whose metadata, shape
or chunk files are wrong, checksum mismatches and non-finite tokens (both unless
``checksums=False``: they need every byte read), annotated queries whose video or query tokens are
missing, videos whose decoded clip count ``T`` differs from ``duration × fps`` by more than
``max_clip_diff`` clips (:func:`duration_mismatches`, which ``r2 extract`` reports too), and an
incomplete extraction or import (tokens without annotations, or annotations without any query tokens
or videos).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shards.errors import StoreError
from shards.quant import stored_dtype
from shards.schema import Query
from shards.store import QUERIES, VIDEOS, FeatureStore, RawArray, open_store

MAX_CLIP_DIFF = 3.0
"""Clips by which a video's length ``T`` may differ from its annotated ``duration × fps`` unreported."""


@dataclass(frozen=True)
class Problem:
    """One finding.

    Attributes:
        kind: ``partial-write`` (staging leftover) | ``bad-video`` (metadata, shape or chunk files) |
            ``checksum`` | ``non-finite`` (NaN / Inf tokens) | ``bad-query-part`` | ``missing-video`` |
            ``missing-query-tokens`` | ``duration-mismatch`` | ``incomplete`` (the store as a whole).
        item: the video id, query id or part / staging name concerned; ``store`` for ``incomplete``.
        detail: what is wrong, one line.
    """

    kind: str
    item: str
    detail: str


@dataclass
class VerifyReport:
    """Result of :func:`verify_store`; ``ok`` when ``problems`` is empty.

    ``dtype`` is how the store holds its tokens (``float16`` / ``int8``) and ``token_bytes`` the bytes
    of the video and query tokens found usable, as stored.
    """

    store: str
    dtype: str = "float16"
    token_bytes: int = 0
    videos: int = 0
    query_parts: int = 0
    queries_with_tokens: int = 0
    annotations: int = 0
    checksums: bool = True
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


NO_ROWS = np.empty(0, np.int64)


def _check_chunks(arr: RawArray, checksums: bool) -> tuple[str | None, np.ndarray]:
    """Why the chunk files of ``arr`` are wrong (or ``None``), and the rows holding non-finite values
    (read only with ``checksums``)."""
    stored = arr.attrs.get("crc32")
    if not isinstance(stored, list) or len(stored) != arr.num_chunks:
        return f"attribute crc32 should list {arr.num_chunks} checksum(s), found {stored!r}", NO_ROWS
    if arr.fast:
        expected = arr.chunk_rows * arr.row_nbytes
        for index in range(arr.num_chunks):
            chunk = arr.chunk_path(index)
            if not chunk.is_file():
                return f"chunk file {chunk.name} is missing", NO_ROWS
            size = chunk.stat().st_size
            if size != expected:
                return f"chunk file {chunk.name} has {size} bytes, expected {expected}", NO_ROWS
    if not checksums:
        return None, NO_ROWS
    try:
        scan = arr.scan()
    except (StoreError, OSError, ValueError) as err:
        return f"unreadable: {err}", NO_ROWS
    bad = [i for i, (a, b) in enumerate(zip(scan.crc32, stored, strict=True)) if a != b]
    if bad:
        pairs = ", ".join(f"chunk {i}: stored {stored[i]}, read {scan.crc32[i]}" for i in bad)
        return f"checksum mismatch ({pairs})", scan.nonfinite_rows
    return None, scan.nonfinite_rows


def _verify_videos(store: FeatureStore, report: VerifyReport, checksums: bool, progress: bool) -> None:
    names = sorted(p.name for p in (store.path / VIDEOS).iterdir() if p.is_dir())
    for vid in tqdm(names, desc="videos", unit="video", disable=None if progress else True):
        report.videos += 1
        if not store.has_video(vid):
            report.problems.append(
                Problem("bad-video", vid, "folder without zarr.json (partial video); rewrite it")
            )
            continue
        try:
            arr = store.video_array(vid)
            fps = float(arr.attrs["fps"])
        except (StoreError, KeyError, TypeError, ValueError) as err:
            report.problems.append(Problem("bad-video", vid, f"unusable metadata: {err}"))
            continue
        if arr.attrs.get("num_clips") != arr.shape[0] or fps <= 0:
            report.problems.append(
                Problem("bad-video", vid, f"attributes {arr.attrs} disagree with shape {arr.shape}")
            )
            continue
        why, nonfinite = _check_chunks(arr, checksums)
        if why:
            kind = "checksum" if why.startswith("checksum") else "bad-video"
            report.problems.append(Problem(kind, vid, why))
        else:
            report.token_bytes += arr.nbytes
        if len(nonfinite):
            clips = ", ".join(map(str, nonfinite[:5])) + (", ..." if len(nonfinite) > 5 else "")
            report.problems.append(
                Problem(
                    "non-finite", vid, f"{len(nonfinite)} clip(s) hold NaN or Inf tokens (clips {clips}); "
                    "training on them skips every step: re-extract the video"
                )
            )


def _verify_queries(store: FeatureStore, report: VerifyReport, checksums: bool) -> set[int | str]:
    """Check every query part; return the ids that have usable tokens."""
    good: set[int | str] = set()
    shape, dtype = store.manifest.stored_query_shape, stored_dtype(store.manifest.dtype)
    for path in sorted((store.path / QUERIES).iterdir()):
        if not path.is_dir():
            continue
        report.query_parts += 1
        try:
            part = RawArray.load(path)
            qids, lengths = part.attrs["qids"], part.attrs["lengths"]
        except (StoreError, KeyError) as err:
            report.problems.append(Problem("bad-query-part", path.name, f"unusable metadata: {err}"))
            continue
        why, nonfinite = None, NO_ROWS
        if len(part.shape) != 3 or part.shape[1:] != shape or part.dtype != dtype:
            why = f"{part.dtype} of shape {part.shape}, the manifest says {dtype} (N, {shape[0]}, {shape[1]})"
        elif len(qids) != len(lengths) or sum(lengths) != part.shape[0] or min(lengths, default=1) < 1:
            why = f"{len(qids)} ids with {sum(lengths)} tokens in total do not fit {part.shape[0]} rows"
        else:
            why, nonfinite = _check_chunks(part, checksums)
        if why:
            kind = "checksum" if why.startswith("checksum") else "bad-query-part"
            report.problems.append(Problem(kind, path.name, why))
        else:
            good.update(qids)
            report.token_bytes += part.nbytes
        owners = np.searchsorted(np.cumsum(lengths), nonfinite, side="right") if len(nonfinite) else NO_ROWS
        for index in np.unique(owners).tolist():
            report.problems.append(
                Problem(
                    "non-finite", str(qids[index]), f"query tokens hold NaN or Inf (part {path.name}); "
                    "training on them skips every step: re-extract the query"
                )
            )
    return good


def _verify_complete(report: VerifyReport) -> None:
    """An extraction or import killed before its last stage: tokens without annotations, or the
    reverse (``r2 extract`` writes videos, then query tokens, then annotations)."""
    rerun = "run the extraction or import again (it resumes)"
    have = f"{report.videos} video(s) and {report.query_parts} query part(s)"
    if not report.annotations:
        detail = f"{have} but no annotations" if report.videos or report.query_parts else "the store is empty"
        report.problems.append(Problem("incomplete", "store", f"{detail}: nothing to train on; {rerun}"))
    elif not report.videos or not report.query_parts:
        report.problems.append(
            Problem(
                "incomplete", "store", f"{report.annotations} annotations but {have}: the extraction stopped "
                f"before writing all its tokens; {rerun}"
            )
        )


def _verify_annotations(
    store: FeatureStore, report: VerifyReport, with_tokens: Iterable[int | str], max_clip_diff: float
) -> None:
    queries = store.annotations()
    report.annotations = len(queries)
    videos = set(store.video_ids())
    with_tokens = set(with_tokens)
    present: list[Query] = []
    for q in queries:
        if q.vid not in videos:
            report.problems.append(
                Problem("missing-video", str(q.qid), f"video {q.vid!r} is not in the store")
            )
        else:
            present.append(q)
        if q.qid not in with_tokens:
            report.problems.append(Problem("missing-query-tokens", str(q.qid), "no query tokens stored"))
    for mismatch in duration_mismatches(store, present, max_clip_diff):
        report.problems.append(Problem("duration-mismatch", mismatch.vid, mismatch.detail))


@dataclass(frozen=True)
class DurationMismatch:
    """A video whose length in the store disagrees with its annotated duration.

    Attributes:
        vid: video id.
        clips: T, clips stored.
        fps: clips per second the video was sampled at.
        duration: annotated duration in seconds (the longest of the video's records).
        max_clip_diff: the tolerance (clips) it exceeds.
    """

    vid: str
    clips: int
    fps: float
    duration: float
    max_clip_diff: float

    @property
    def seconds(self) -> float:
        """The video's length as sampled, ``T / fps`` seconds."""
        return self.clips / self.fps

    @property
    def detail(self) -> str:
        """One line: T, the annotated duration and what follows from the difference."""
        expected = self.duration * self.fps
        return (
            f"T={self.clips} clips but duration {self.duration:g} s x {self.fps:g} fps = {expected:g} clips "
            f"(differs by more than {self.max_clip_diff:g}; moments get clamped to T / fps)"
        )


def duration_mismatches(
    store: FeatureStore, queries: Iterable[Query], max_clip_diff: float = MAX_CLIP_DIFF
) -> list[DurationMismatch]:
    """The videos of ``queries`` in ``store`` whose clip count ``T`` differs from ``duration × fps`` by more
    than ``max_clip_diff`` clips, sorted by video id (videos absent or unreadable are left out).

    A video's duration is the longest of its records (seconds); ``fps`` is the video's stored rate.
    """
    durations: dict[str, float] = {}
    for q in queries:
        durations[q.vid] = max(durations.get(q.vid, 0.0), float(q.duration))
    found = []
    for vid, duration in sorted(durations.items()):
        try:
            clips, fps = store.video_length(vid), store.video_fps(vid)
        except (StoreError, KeyError, ValueError):
            continue
        if abs(clips - duration * fps) > max_clip_diff:
            found.append(DurationMismatch(vid, clips, fps, duration, max_clip_diff))
    return found


def verify_store(
    path: str | Path, *, checksums: bool = True, max_clip_diff: float = MAX_CLIP_DIFF, progress: bool = False
) -> VerifyReport:
    """Check the store at ``path`` and return every problem found (never raises for damaged data).

    Args:
        path: store directory; :class:`StoreError` if it is not a store at all.
        checksums: read all token bytes and compare their CRC-32 with the stored ones.
        max_clip_diff: tolerated ``|T - duration * fps|`` in clips.
        progress: show a tqdm bar over the videos.
    """
    store = open_store(path)
    report = VerifyReport(store=str(store.path), dtype=store.manifest.dtype, checksums=checksums)
    for name in store.staging_entries():
        label = name.rpartition("+")[0] or name
        report.problems.append(
            Problem(
                "partial-write", label, f"{name}: leftover of an interrupted (or running) write; rewrite it"
            )
        )
    _verify_videos(store, report, checksums, progress)
    with_tokens = _verify_queries(store, report, checksums)
    report.queries_with_tokens = len(with_tokens)
    _verify_annotations(store, report, with_tokens, max_clip_diff)
    _verify_complete(report)
    return report
