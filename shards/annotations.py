"""Parse each dataset's annotation files into the normalized :class:`shards.schema.Query` list.

Every supported file is JSON Lines, one object per line:

* QVHighlights, Charades-STA, TACoS, Ego4D-NLQ (moment_detr schema): ``qid``, ``query``,
  ``duration`` (s), ``vid``, optional ``relevant_windows`` ``[[start, end], ...]`` (s) and, for
  QVHighlights, ``relevant_clip_ids`` + ``saliency_scores`` (2-s clips, 3 workers, 0..4). A file
  without ``relevant_windows`` (QVHighlights test) gives queries with no moments.
* YouTube Highlights (lighthouse schema): ``vid``, ``query`` (or ``title``), ``domain``,
  ``match`` (one of -1/0/1 per annotated clip), ``frames`` and ``fps`` of the source video;
  optional ``qid`` (default ``vid``), ``duration``, ``label``, ``clip``. Duration is
  ``frames / fps`` seconds and the per-video sampling rate is
  ``Query.fps = len(match) / duration`` clips per second.
* TVSum (lighthouse schema): ``vid``, ``query`` (or ``title``), ``domain``, ``label``
  ``[clips][20 annotators]`` scores 1..5 per 2-s clip; optional ``qid`` (default ``vid``) and
  ``duration``, which counts 2-s clips (so must equal ``len(label)``). ``Query.duration`` is
  ``2 * len(label)`` seconds.
* Custom (one's own videos, ``--dataset custom``, docs/custom-data.md): ``vid`` (or ``video``, a
  file name whose extension is dropped), ``query``, and the moment as ``start`` + ``end`` (s) or
  ``relevant_windows``; optional ``qid`` (default: a stable id made of the video id and a hash of
  the sentence and windows), ``duration`` (default: read from the video by the caller's
  ``durations`` function, as ``r2 extract`` does) and QVHighlights-style saliency
  (``relevant_clip_ids`` + ``saliency_scores`` over 2-s clips).

Which files are read, and the split of each (``FILE:SPLIT``, the file name, or one file per split of a
folder), is decided by :mod:`shards.annotation_files`.

Moment windows: a window with ``end < start`` is rejected. A window that sticks out of
``[0, duration]`` by at most one clip (``1 / fps`` of the dataset: 2 s QVHighlights / TACoS /
Ego4D-NLQ, 1 s Charades-STA) is clamped into it; one that sticks out further, or starts at or
after ``duration``, is rejected.

Errors are :class:`shards.errors.AnnotationError`; problems with one record start with
``file:line:`` and name the field, problems with the whole file start with ``file:``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from shards.annotation_files import infer_split, resolve_annotation_args
from shards.datasets import DatasetSpec, get_dataset
from shards.errors import AnnotationError
from shards.jsonl import json_type_name, read_json_objects
from shards.paths import unsafe_id_reason
from shards.schema import Query

QVH_CLIP_SECONDS = 2.0
"""Clip length of moment_detr ``relevant_clip_ids`` / ``saliency_scores``."""
QVH_WORKERS = 3
QVH_MAX_SCORE = 4
TVSUM_ANNOTATORS = 20
TVSUM_CLIP_SECONDS = 2.0
"""Clip length of TVSum ``label`` rows."""
DURATION_TOLERANCE = 1e-3
"""Seconds two records of one video may disagree on its duration."""
YOUTUBE_DURATION_TOLERANCE = 0.01
"""Seconds an explicit YouTube ``duration`` may differ from ``frames / fps``."""

_Entry = tuple[str, int, Query]  # (file, line, query)
_Parser = Callable[[dict[str, Any], str, DatasetSpec, str], Query]
Durations = Callable[[str], float]
"""Duration in seconds of a video id (``custom`` records without ``duration``)."""


def load_annotations(dataset: str, path: str | Path, split: str | None = None) -> list[Query]:
    """Parse one annotation file of ``dataset`` into queries (times in seconds), in file order.

    Args:
        dataset: registry name or alias (see :func:`shards.datasets.get_dataset`).
        path: the JSON Lines file.
        split: ``train`` / ``val`` / ``test``; inferred from the file name when ``None``.

    Raises:
        UnknownDatasetError: unknown ``dataset``.
        AnnotationError: missing / empty / malformed file, a bad record (``file:line: field ...``),
            a duplicate query id, or a split that cannot be inferred or does not exist.
    """
    spec = get_dataset(dataset)
    entries = _load_entries(spec, Path(path), split)
    _check_consistent(entries)
    return [q for _, _, q in entries]


def load_many(
    dataset: str,
    paths: Iterable[str | Path],
    split: str | None = None,
    durations: Durations | None = None,
) -> list[Query]:
    """Parse several annotation files of ``dataset`` and concatenate them in the given order.

    Each item is ``FILE``, ``FILE:SPLIT`` or a folder (one file per split:
    :func:`shards.annotation_files.resolve_annotation_args`); a file's split is the one given with it,
    else ``split`` (applies to all), else the one its name names. Query ids must be
    unique over all files, and one video must have one duration; a clash names both places
    (``file:line``). ``durations`` gives the length of videos whose ``custom`` records have no
    ``duration``.

    Raises:
        AnnotationError: as :func:`load_annotations`, or no files given.
    """
    spec = get_dataset(dataset)
    files = resolve_annotation_args(list(paths), spec.name).files
    if not files:
        raise AnnotationError(f"no {spec.title} annotation files given; pass at least one .jsonl file")
    entries = [e for path, given in files for e in _load_entries(spec, path, given or split, durations)]
    _check_consistent(entries)
    return [q for _, _, q in entries]


def _load_entries(
    spec: DatasetSpec, path: Path, split: str | None, durations: Durations | None = None
) -> list[_Entry]:
    split = _resolve_split(spec, path, split)
    parse = partial(_parse_custom, durations=durations) if spec.name == "custom" else (
        _PARSERS.get(spec.name, _parse_moments)
    )
    name = str(path)
    entries = []
    for line, record in _read_records(spec, path):
        entries.append((name, line, parse(record, f"{name}:{line}", spec, split)))
    return entries


def _resolve_split(spec: DatasetSpec, path: Path, split: str | None) -> str:
    if split is None:
        split = infer_split(path)
        if split is None:
            raise AnnotationError(
                f"{path}: cannot tell the split from the file name; put one of "
                f"{', '.join(spec.splits)} in the name or give it after the file: {path}:train"
            )
    _check_split(spec, path, split)
    return split


def _check_split(spec: DatasetSpec, where: Path, split: str) -> None:
    if split not in spec.splits:
        raise AnnotationError(
            f"{where}: {spec.title} has no split {split!r}; valid splits: {', '.join(spec.splits)}"
        )


def _read_records(spec: DatasetSpec, path: Path) -> list[tuple[int, dict[str, Any]]]:
    """All JSON objects of a JSON Lines file with their 1-based line numbers; blank lines skipped."""
    if not path.exists():
        raise AnnotationError(
            f"{path}: annotation file not found; put the {spec.title} annotations there "
            f"(expected names are listed in docs/datasets.md)"
        )
    if path.is_dir():
        raise AnnotationError(f"{path}: is a folder; pass the JSON Lines annotation file inside it")
    records = list(read_json_objects(path, AnnotationError))
    if not records:
        raise AnnotationError(f"{path}: empty annotation file (no JSON records)")
    return records


def _check_consistent(entries: list[_Entry]) -> None:
    """Reject duplicate query ids (``5`` and ``"5"`` clash) and videos with two durations."""
    qids: dict[str, tuple[str, int]] = {}
    durations: dict[str, tuple[float, str, int]] = {}
    for name, line, q in entries:
        key = str(q.qid)
        if key in qids:
            first_name, first_line = qids[key]
            raise AnnotationError(
                f"{name}:{line}: field 'qid': duplicate query id {q.qid!r}, first used at "
                f"{first_name}:{first_line}; query ids must be unique"
            )
        qids[key] = (name, line)
        seen = durations.setdefault(q.vid, (q.duration, name, line))
        if abs(seen[0] - q.duration) > DURATION_TOLERANCE:
            raise AnnotationError(
                f"{name}:{line}: field 'duration': video {q.vid!r} has duration {q.duration:g} s here "
                f"but {seen[0]:g} s at {seen[1]}:{seen[2]}; one video must have one duration"
            )


# ---------------------------------------------------------------------------------------------
# Field checks. ``where`` is the ``file:line`` prefix of the record.


def _bad(where: str, field: str, problem: str) -> AnnotationError:
    return AnnotationError(f"{where}: field '{field}' {problem}")


def _wrong_type(where: str, field: str, expected: str, value: Any) -> AnnotationError:
    return _bad(where, field, f"must be {expected}, got {json_type_name(value)} {json.dumps(value)[:60]}")


def _required(record: dict[str, Any], field: str, where: str) -> Any:
    value = record.get(field)
    if value is None:
        raise AnnotationError(f"{where}: missing required field '{field}'")
    return value


def _number(value: Any, field: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(where, field, "a number", value)
    if not math.isfinite(value):
        raise _bad(where, field, f"must be finite, got {value}")
    return float(value)


def _positive(value: Any, field: str, where: str) -> float:
    number = _number(value, field, where)
    if number <= 0:
        raise _bad(where, field, f"must be > 0, got {number:g}")
    return number


def _integer(value: Any, field: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(where, field, "an integer", value)
    return value


def _list(value: Any, field: str, where: str, non_empty: bool = False) -> list[Any]:
    if not isinstance(value, list):
        raise _wrong_type(where, field, "a list", value)
    if non_empty and not value:
        raise _bad(where, field, "is an empty list")
    return value


def _text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise _wrong_type(where, field, "a string", value)
    if not value.strip():
        raise _bad(where, field, "is empty")
    return value


def _safe_id(value: str, field: str, where: str) -> str:
    reason = unsafe_id_reason(value)
    if reason is not None:
        raise _bad(where, field, f"{value!r} cannot be used as a file or store key: {reason}")
    return value


def _vid(record: dict[str, Any], where: str) -> str:
    return _safe_id(_text(_required(record, "vid", where), "vid", where), "vid", where)


def _qid(record: dict[str, Any], where: str) -> int | str:
    value = _required(record, "qid", where)
    if isinstance(value, str):
        return _safe_id(_text(value, "qid", where), "qid", where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(where, "qid", "an integer or a string", value)
    return value


def _title(record: dict[str, Any], where: str) -> str:
    field = "title" if record.get("title") is not None else "query"
    if record.get(field) is None:
        raise AnnotationError(f"{where}: missing required field 'query' (or 'title')")
    return _text(record[field], field, where)


def _domain(record: dict[str, Any], spec: DatasetSpec, where: str) -> str:
    domain = _text(_required(record, "domain", where), "domain", where)
    if domain not in spec.domains:
        expected = ", ".join(spec.domains)
        raise _bad(where, "domain", f"{domain!r} is not a {spec.title} domain; expected one of: {expected}")
    return domain


def _windows(value: Any, duration: float, tolerance: float, where: str) -> list[list[float]]:
    """``relevant_windows`` → ``[[start, end], ...]`` seconds inside ``[0, duration]``.

    Windows sticking out by at most ``tolerance`` seconds are clamped; see the module docstring.
    """
    windows = []
    for i, window in enumerate(_list(value, "relevant_windows", where)):
        field = f"relevant_windows[{i}]"
        if not isinstance(window, list) or len(window) != 2:
            raise _wrong_type(where, field, "a [start, end] pair", window)
        start = _number(window[0], field, where)
        end = _number(window[1], field, where)
        if end < start:
            raise _bad(where, field, f"has end {end:g} < start {start:g}")
        if start < -tolerance or end > duration + tolerance:
            raise _bad(
                where,
                field,
                f"[{start:g}, {end:g}] lies outside [0, duration={duration:g}] by more than one clip "
                f"({tolerance:g} s); fix the window or the duration",
            )
        if start >= duration:
            raise _bad(where, field, f"starts at {start:g} s, at or after the video's end ({duration:g} s)")
        windows.append([max(start, 0.0), min(end, duration)])
    return windows


def _qvh_saliency(record: dict[str, Any], duration: float, where: str) -> dict[str, Any] | None:
    """``relevant_clip_ids`` + ``saliency_scores`` → ``{"clip_ids": [...], "scores": [[a, b, c], ...]}``."""
    ids_value = record.get("relevant_clip_ids")
    scores_value = record.get("saliency_scores")
    if ids_value is None and scores_value is None:
        return None
    if ids_value is None or scores_value is None:
        missing, present = ("relevant_clip_ids", "saliency_scores")[:: 1 if ids_value is None else -1]
        raise AnnotationError(f"{where}: missing required field '{missing}' (required with '{present}')")
    n_clips = math.ceil(duration / QVH_CLIP_SECONDS)
    clip_ids = _list(ids_value, "relevant_clip_ids", where)
    for i, clip in enumerate(clip_ids):
        if not 0 <= _integer(clip, f"relevant_clip_ids[{i}]", where) < n_clips:
            raise _bad(
                where, f"relevant_clip_ids[{i}]", f"= {clip} is outside the video's {n_clips} clips of 2 s"
            )
    if len(set(clip_ids)) != len(clip_ids):
        raise _bad(where, "relevant_clip_ids", "repeats a clip id")
    scores = _list(scores_value, "saliency_scores", where)
    if len(scores) != len(clip_ids):
        raise _bad(
            where, "saliency_scores", f"has {len(scores)} rows but 'relevant_clip_ids' has {len(clip_ids)}"
        )
    for i, row in enumerate(scores):
        field = f"saliency_scores[{i}]"
        if not isinstance(row, list) or len(row) != QVH_WORKERS:
            raise _wrong_type(where, field, f"a list of {QVH_WORKERS} worker scores", row)
        for score in row:
            if not 0 <= _integer(score, field, where) <= QVH_MAX_SCORE:
                raise _bad(where, field, f"has score {score} outside 0..{QVH_MAX_SCORE}")
    return {"clip_ids": clip_ids, "scores": scores}


# ---------------------------------------------------------------------------------------------
# Record parsers, one per annotation schema.


def _parse_moments(record: dict[str, Any], where: str, spec: DatasetSpec, split: str) -> Query:
    """moment_detr schema (QVHighlights, Charades-STA, TACoS, Ego4D-NLQ)."""
    qid = _qid(record, where)
    text = _text(_required(record, "query", where), "query", where)
    duration = _positive(_required(record, "duration", where), "duration", where)
    header = (_vid(record, where), qid, text, duration)
    return _moment_query(record, where, spec, split, header, record.get("relevant_windows"))


def _moment_query(
    record: dict[str, Any],
    where: str,
    spec: DatasetSpec,
    split: str,
    header: tuple[str, int | str, str, float],
    windows: Any,
) -> Query:
    """The :class:`Query` of a moment record with its checked ``header`` ``(vid, qid, text, duration)``:
    its ``windows`` clamped into the video (by at most one clip) and its QVHighlights-style saliency."""
    vid, qid, text, duration = header
    tolerance = spec.clip_seconds if spec.clip_seconds is not None else 0.0
    return Query(
        vid=vid,
        qid=qid,
        text=text,
        duration=duration,
        split=split,
        moments=[] if windows is None else _windows(windows, duration, tolerance, where),
        saliency=_qvh_saliency(record, duration, where),
    )


def _lighthouse_header(
    record: dict[str, Any], spec: DatasetSpec, where: str
) -> tuple[str, int | str, str, str]:
    """``(vid, qid, text, domain)`` of a lighthouse record (YouTube, TVSum); ``qid`` defaults to ``vid``."""
    vid = _vid(record, where)
    qid = _qid(record, where) if record.get("qid") is not None else vid
    return vid, qid, _title(record, where), _domain(record, spec, where)


def _parse_youtube(record: dict[str, Any], where: str, spec: DatasetSpec, split: str) -> Query:
    """lighthouse YouTube Highlights schema; sets the per-video ``fps`` (clips per second)."""
    vid, qid, text, domain = _lighthouse_header(record, spec, where)
    match = _list(_required(record, "match", where), "match", where, non_empty=True)
    for i, value in enumerate(match):
        if _integer(value, f"match[{i}]", where) not in (-1, 0, 1):
            raise _bad(where, f"match[{i}]", f"= {value} must be -1, 0 or 1")
    frames = _positive(_required(record, "frames", where), "frames", where)
    video_fps = _positive(_required(record, "fps", where), "fps", where)
    duration = frames / video_fps
    if record.get("duration") is not None:
        given = _number(record["duration"], "duration", where)
        if abs(given - duration) > YOUTUBE_DURATION_TOLERANCE:
            raise _bad(where, "duration", f"= {given:g} s disagrees with frames / fps = {duration:g} s")
    for field in ("label", "clip"):
        if record.get(field) is not None and len(_list(record[field], field, where)) != len(match):
            raise _bad(where, field, f"has {len(record[field])} entries but 'match' has {len(match)}")
    return Query(
        vid=vid,
        qid=qid,
        text=text,
        duration=duration,
        split=split,
        saliency={"match": match},
        domain=domain,
        fps=len(match) / duration,
    )


def _parse_tvsum(record: dict[str, Any], where: str, spec: DatasetSpec, split: str) -> Query:
    """lighthouse TVSum schema; ``duration`` in the file counts 2-s clips."""
    vid, qid, text, domain = _lighthouse_header(record, spec, where)
    label = _list(_required(record, "label", where), "label", where, non_empty=True)
    scores = []
    for i, row in enumerate(label):
        field = f"label[{i}]"
        if not isinstance(row, list) or len(row) != TVSUM_ANNOTATORS:
            raise _wrong_type(where, field, f"a list of {TVSUM_ANNOTATORS} annotator scores", row)
        values = [_number(v, field, where) for v in row]
        if not all(1.0 <= v <= 5.0 for v in values):
            raise _bad(where, field, "has a score outside 1..5")
        scores.append(values)
    if record.get("duration") is not None:
        clips = _number(record["duration"], "duration", where)
        if clips != len(label):
            raise _bad(
                where,
                "duration",
                f"= {clips:g} must equal the number of 2-s clips in 'label' ({len(label)}); "
                "in TVSum files it counts clips, not seconds",
            )
    return Query(
        vid=vid,
        qid=qid,
        text=text,
        duration=len(label) * TVSUM_CLIP_SECONDS,
        split=split,
        saliency={"scores": scores},
        domain=domain,
    )


def _custom_vid(record: dict[str, Any], where: str) -> str:
    """``vid``, or the stem of ``video`` (a file name)."""
    if record.get("vid") is not None or record.get("video") is None:
        return _vid(record, where)
    name = _text(record["video"], "video", where)
    return _safe_id(Path(name).stem if Path(name).suffix else name, "video", where)


def _custom_windows(record: dict[str, Any], where: str) -> Any:
    """``relevant_windows``, or ``[[start, end]]``, or ``None`` (no moment)."""
    start, end = record.get("start"), record.get("end")
    if start is None and end is None:
        return record.get("relevant_windows")
    if record.get("relevant_windows") is not None:
        raise AnnotationError(
            f"{where}: give the moment as 'start' + 'end' or as 'relevant_windows', not both"
        )
    if start is None or end is None:
        missing = "start" if start is None else "end"
        raise AnnotationError(f"{where}: missing required field '{missing}' (required with the other)")
    return [[start, end]]


def custom_qid(vid: str, text: str, windows: Any) -> str:
    """The id of a ``custom`` record without ``qid``: ``<vid>-<8 hex>`` from a hash of the video, the
    sentence and the windows, so it stays the same however the file is reordered."""
    digest = hashlib.sha1(json.dumps([vid, text, windows]).encode("utf-8")).hexdigest()[:8]
    return f"{vid}-{digest}"


def _parse_custom(
    record: dict[str, Any], where: str, spec: DatasetSpec, split: str, durations: Durations | None = None
) -> Query:
    """``custom`` schema (module docstring): moment_detr fields with ``qid`` and ``duration`` optional."""
    vid = _custom_vid(record, where)
    text = _text(_required(record, "query", where), "query", where)
    windows = _custom_windows(record, where)
    if record.get("duration") is not None:
        duration = _positive(record["duration"], "duration", where)
    elif durations is not None:
        duration = durations(vid)
    else:
        raise AnnotationError(
            f"{where}: missing field 'duration'; give the video's length in seconds (r2 extract reads it "
            "from the video when the field is absent)"
        )
    qid = _qid(record, where) if record.get("qid") is not None else custom_qid(vid, text, windows)
    return _moment_query(record, where, spec, split, (vid, qid, text, duration), windows)


_PARSERS: dict[str, _Parser] = {"youtube": _parse_youtube, "tvsum": _parse_tvsum}
