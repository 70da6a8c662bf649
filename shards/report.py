"""Summary of a feature store (``r2 shards inspect``): counts, shapes, bytes and the manifest."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from shards.store import open_store


def _disk_usage(path: Path) -> tuple[int, int]:
    """``(bytes, files)`` of all regular files under ``path``."""
    size = files = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            size += os.stat(os.path.join(root, name)).st_size
            files += 1
    return size, files


def _stats(values: list[int]) -> dict[str, float | int | None]:
    if not values:
        return {"min": None, "mean": None, "max": None}
    return {"min": min(values), "mean": round(sum(values) / len(values), 2), "max": max(values)}


def inspect_store(path: str | Path) -> dict[str, Any]:
    """A JSON-able summary of the store at ``path`` (reads metadata only, no tokens).

    Keys: ``path``, ``manifest``, ``videos`` (count, clips per video ``T`` min/mean/max, total
    clips, bytes, fps values), ``queries`` (count with tokens, parts, tokens per query ``L``
    min/mean/max, bytes), ``annotations`` (count, per split, distinct videos, videos missing),
    ``shapes`` (video ``[T, k, P, C]`` and query ``[L, k, Cq]`` with ``null`` for the variable
    axis), ``disk`` (bytes and files), ``partial_writes`` (leftover staging entries).
    """
    store = open_store(path)
    m = store.manifest
    vids = store.video_ids()
    clips = [store.video_length(v) for v in vids]
    fps_values = sorted({store.video_fps(v) for v in vids})
    video_bytes = sum(store.video_nbytes(v) for v in vids)
    lengths = [store.query_length(q) for q in store.query_ids()]
    query_bytes = sum(store.query_nbytes(q) for q in store.query_ids())
    queries = store.annotations()
    annotated_videos = {q.vid for q in queries}
    disk_bytes, disk_files = _disk_usage(store.path)
    return {
        "path": str(store.path),
        "manifest": m.to_attrs(),
        "videos": {
            "count": len(vids),
            "clips": _stats(clips),
            "clips_total": sum(clips),
            "fps": fps_values,
            "bytes": video_bytes,
        },
        "queries": {
            "count": len(lengths),
            "parts": len(store.query_parts()),
            "tokens": _stats(lengths),
            "bytes": query_bytes,
        },
        "annotations": {
            "count": len(queries),
            "splits": dict(sorted(Counter(q.split for q in queries).items())),
            "videos": len(annotated_videos),
            "videos_missing": len(annotated_videos - set(vids)),
        },
        "shapes": {
            "video": [None, *m.video_shape],
            "query": [None, *m.query_shape],
        },
        "disk": {"bytes": disk_bytes, "files": disk_files},
        "partial_writes": len(store.staging_entries()),
    }


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _spread(stats: dict[str, Any]) -> str:
    """``min/mean/max`` of :func:`_stats`, or ``none`` when there were no values."""
    if stats["min"] is None:
        return "none"
    return f"min/mean/max {stats['min']}/{stats['mean']}/{stats['max']}"


def _splits(counts: dict[str, int]) -> str:
    """``(train 4, test 4)``; empty when there are none."""
    return "(" + ", ".join(f"{split} {n}" for split, n in counts.items()) + ")" if counts else ""


def format_summary(info: dict[str, Any]) -> str:
    """Human-readable text of an :func:`inspect_store` result."""
    m, v, q, a = info["manifest"], info["videos"], info["queries"], info["annotations"]
    fps = "per video" if m["fps"] is None else f"{m['fps']:g}"
    k, p, c = info["shapes"]["video"][1:]
    clips, tokens = v["clips"], q["tokens"]
    lines = [
        f"store        {info['path']}",
        f"dataset      {m['dataset']}",
        f"backbone     {m['backbone']} (pretrained {m['pretrained']}, sha256 {m['weights_sha256']})",
        f"geometry     k={k} layers, P={p} tokens x C={c}, Cq={m['text_width']}, "
        f"frame {m['frame_size']} px, fps {fps}, token 0 {m.get('global_token', 'cls')}, "
        f"token pool {m.get('token_pool', 1)}",
        f"format       v{m['format_version']}, {m['dtype']}, package {m['package_version']}, "
        f"created {m['created']}",
        f"videos       {v['count']}  T {_spread(clips)}  ({v['clips_total']} clips, {_size(v['bytes'])})",
        f"queries      {q['count']} with tokens in {q['parts']} part(s)  L {_spread(tokens)}  "
        f"({_size(q['bytes'])})",
        f"annotations  {a['count']} {_splits(a['splits'])} over {a['videos']} videos "
        f"({a['videos_missing']} not in the store)",
        f"on disk      {_size(info['disk']['bytes'])} in {info['disk']['files']} files",
    ]
    if info["partial_writes"]:
        lines.append(
            f"partial      {info['partial_writes']} leftover staging entries (run `r2 shards verify`)"
        )
    return "\n".join(lines)
