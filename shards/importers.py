"""Import existing token caches into a feature store (``r2 shards import-npy`` / ``import-h5``).

Sources:

* the official R²-Tuning caches: one ``<vid>.npy`` of shape ``(T, k, P, C)`` per video (ViT-B/32:
  ``(T, 4, 50, 768)``) and one ``<qid>.npy`` of shape ``(L, k, Cq)`` per query (``(L, 4, 512)``);
* an HDF5 file with one dataset ``(T, k, P, C)`` per video id in ``video_group`` and, optionally,
  one dataset ``(L, k, Cq)`` per query id in ``query_group``.

Pooled 2-D features ``(T, 512)`` (what many other toolkits ship) lack the layer and token axes the
R² block needs and are refused. Every source file's shape is checked before anything is written,
and its values when it is read (NaN / Inf, or beyond float16, are refused naming the file).
Imports are resumable: videos and queries already in the store are skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from shards.annotations import load_annotations
from shards.backbones import Backbone, find_backbone, normalize_backbone
from shards.datasets import DatasetSpec, get_dataset
from shards.errors import ConfigError, StoreError
from shards.schema import Query
from shards.store import FeatureStore, check_id, create_store, make_manifest
from shards.tokens import check_finite

QUERY_BATCH = 1024
"""Queries written per store part (each part is one atomic write, so a killed import loses little)."""


@dataclass
class ImportSummary:
    """What an import did."""

    store: str
    videos_found: int = 0
    videos_written: int = 0
    videos_skipped: int = 0
    queries_found: int = 0
    queries_written: int = 0
    queries_skipped: int = 0
    annotations: int = 0
    queries_without_tokens: list[int | str] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """Human-readable summary."""
        mb = self.bytes_written / 1e6
        out = [
            f"store       {self.store}",
            f"videos      {self.videos_written} written, {self.videos_skipped} already there "
            f"({self.videos_found} found)",
            f"queries     {self.queries_written} written, {self.queries_skipped} already there "
            f"({self.queries_found} found)",
            f"annotations {self.annotations} merged",
            f"written     {mb:.1f} MB in {self.seconds:.1f} s",
        ]
        if self.queries_without_tokens:
            head = ", ".join(map(str, self.queries_without_tokens[:5]))
            more = len(self.queries_without_tokens) - 5
            out.append(
                f"warning     {len(self.queries_without_tokens)} annotated queries have no token file "
                f"({head}{f', ... {more} more' if more > 0 else ''})"
            )
        return out


@dataclass(frozen=True)
class _Item:
    """One source array: store key, shape, where it comes from, and how to load it."""

    key: int | str
    shape: tuple[int, ...]
    where: str
    load: Callable[[], np.ndarray]

    def read(self) -> np.ndarray:
        """The array, checked against the shape its header gave and to hold finite float16 values."""
        array = self.load()
        if array.shape != self.shape:
            raise StoreError(f"{self.where}: read shape {array.shape}, header said {self.shape}")
        check_finite(array, self.where)
        return array


def _check_videos(items: Sequence[_Item], backbone: str, geometry: Backbone | None) -> tuple[int, int, int]:
    """Validate the video sources (against ``geometry`` when known); return their common ``(k, P, C)``."""
    if not items:
        raise StoreError("no video features found; check the video folder / HDF5 group")
    first = items[0]
    for item in items:
        if len(item.shape) == 2:
            raise StoreError(
                f"{item.where}: pooled features of shape {item.shape} cannot feed the R² block, which needs "
                "per-layer patch tokens (T, k, P, C); extract them with `r2 extract`"
            )
        if len(item.shape) != 4 or item.shape[0] < 1:
            raise StoreError(f"{item.where}: shape {item.shape} is not video tokens (T, k, P, C)")
        if item.shape[1:] != first.shape[1:]:
            raise StoreError(
                f"{item.where}: shape {item.shape} has (k, P, C) = {item.shape[1:]}, but {first.where} "
                f"has {first.shape[1:]}; all videos of a store need the same layers and backbone"
            )
    k, p, c = first.shape[1:]
    if geometry and (p, c) != (geometry.video_tokens, geometry.video_width):
        raise StoreError(
            f"{first.where}: shape {first.shape} has P={p}, C={c} but backbone {backbone} gives "
            f"P={geometry.video_tokens}, C={geometry.video_width}; pass the right --backbone"
        )
    return k, p, c


def _check_queries(
    items: Sequence[_Item], layers: int, backbone: str, geometry: Backbone | None
) -> int | None:
    """Validate the query sources (against ``geometry`` when known); return their common Cq
    (``None`` when there are none)."""
    if not items:
        return None
    first = items[0]
    for item in items:
        if len(item.shape) != 3 or item.shape[0] < 1:
            raise StoreError(
                f"{item.where}: shape {item.shape} is not query tokens (L, k, Cq); pooled or single-layer "
                "text features cannot feed the R² block"
            )
        if item.shape[1] != layers:
            raise StoreError(
                f"{item.where}: shape {item.shape} has k={item.shape[1]} layers, the videos have {layers}"
            )
        if item.shape[2] != first.shape[2]:
            raise StoreError(
                f"{item.where}: width {item.shape[2]} differs from {first.where} ({first.shape[2]})"
            )
    if geometry and first.shape[2] != geometry.text_width:
        raise StoreError(
            f"{first.where}: shape {first.shape} has Cq={first.shape[2]} but backbone {backbone} gives "
            f"Cq={geometry.text_width}; pass the right --backbone"
        )
    return int(first.shape[2])


def _video_fps(
    spec: DatasetSpec, fps: float | None, queries: Sequence[Query], vids: Sequence[str]
) -> dict[str, float]:
    """Per-video fps: ``fps``, else the dataset's, else the annotation's per-video rate."""
    rate = fps if fps is not None else spec.fps
    if rate is not None:
        return dict.fromkeys(vids, float(rate))
    per_video = {q.vid: q.fps for q in queries if q.fps}
    missing = [v for v in vids if v not in per_video]
    if missing:
        raise StoreError(
            f"{spec.title} samples every video at its own rate, but {len(missing)} video(s) have no "
            f"annotation giving it (e.g. {missing[0]!r}); pass --annotations files covering them or --fps"
        )
    return {v: float(per_video[v]) for v in vids}


def _query_key(stem: str, by_name: dict[str, int | str]) -> int | str:
    """Query id of a file stem: the annotation's id when known (keeps ints), else int for digits."""
    if stem in by_name:
        return by_name[stem]
    return int(stem) if stem.isdigit() else stem


def _run_import(
    *,
    spec: DatasetSpec,
    videos: Sequence[_Item],
    query_items: Sequence[_Item],
    queries: Sequence[Query],
    out: str | Path,
    backbone: str,
    pretrained: str,
    weights_sha256: str,
    fps: float | None,
    frame_size: int | None,
    progress: bool,
) -> ImportSummary:
    start = time.perf_counter()
    geometry = find_backbone(backbone)
    if geometry is not None and frame_size not in (None, geometry.frame_size):
        raise ConfigError(
            f"backbone {geometry.name} takes {geometry.frame_size} px frames, not --frame-size {frame_size}; "
            "--frame-size is only for a backbone the registry does not know"
        )
    k, p, c = _check_videos(videos, backbone, geometry)
    cq = _check_queries(query_items, k, backbone, geometry)
    if geometry is not None:
        frame, text_width = geometry.frame_size, geometry.text_width
    elif cq is None:
        raise StoreError(
            f"unknown backbone {backbone!r} and no query tokens to read Cq from; import query tokens too"
        )
    elif frame_size is None:
        raise StoreError(f"unknown backbone {backbone!r}: pass --frame-size")
    else:
        frame, text_width = frame_size, cq
    rates = _video_fps(spec, fps, queries, [str(v.key) for v in videos])
    manifest = make_manifest(
        dataset=spec.name,
        backbone=normalize_backbone(backbone),
        pretrained=pretrained,
        weights_sha256=weights_sha256,
        layers=k,
        frame_size=frame,
        fps=fps if fps is not None else spec.fps,
        video_tokens=p,
        video_width=c,
        text_width=text_width,
    )
    store = create_store(out, manifest)
    summary = ImportSummary(store=str(store.path), videos_found=len(videos), queries_found=len(query_items))
    if queries:
        store.write_annotations(queries)
        summary.annotations = len(queries)
    _import_videos(store, videos, rates, summary, progress)
    _import_queries(store, query_items, summary, progress)
    have = set(store.query_ids())
    summary.queries_without_tokens = [q.qid for q in queries if q.qid not in have]
    summary.seconds = time.perf_counter() - start
    return summary


def _import_videos(
    store: FeatureStore,
    videos: Sequence[_Item],
    rates: dict[str, float],
    summary: ImportSummary,
    progress: bool,
) -> None:
    done = set(store.video_ids())
    bar = tqdm(videos, desc="videos", unit="video", disable=None if progress else True)
    for item in bar:
        vid = str(item.key)
        if vid in done:
            summary.videos_skipped += 1
            continue
        tokens = item.read()
        store.write_video(vid, tokens, rates[vid])
        summary.videos_written += 1
        summary.bytes_written += tokens.size * 2


def _import_queries(
    store: FeatureStore, items: Sequence[_Item], summary: ImportSummary, progress: bool
) -> None:
    have = set(store.query_ids())
    todo = [item for item in items if item.key not in have]
    summary.queries_skipped = len(items) - len(todo)
    bar = tqdm(total=len(todo), desc="queries", unit="query", disable=None if progress else True)
    for begin in range(0, len(todo), QUERY_BATCH):
        batch = todo[begin : begin + QUERY_BATCH]
        tokens = [item.read() for item in batch]
        store.write_queries([item.key for item in batch], tokens)
        summary.queries_written += len(batch)
        summary.bytes_written += sum(t.size * 2 for t in tokens)
        bar.update(len(batch))
    bar.close()


def _load_queries(dataset: str, annotations: Sequence[str | Path]) -> list[Query]:
    return [q for path in annotations for q in load_annotations(dataset, path)]


def _npy_item(path: Path, key: int | str) -> _Item:
    try:
        header = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: not a readable .npy file ({err})") from None
    return _Item(key, tuple(header.shape), str(path), lambda: np.load(path))


def _video_key(stem: str, spec: DatasetSpec, where: Path) -> str:
    vid = stem.removesuffix(spec.video_suffix) if spec.video_suffix else stem
    check_id(vid, f"video (from {where})")
    return vid


def import_npy(
    *,
    dataset: str,
    video_dir: str | Path,
    out: str | Path,
    query_dir: str | Path | None = None,
    annotations: Sequence[str | Path] = (),
    backbone: str = "ViT-B-32",
    pretrained: str = "openai",
    weights_sha256: str = "unknown",
    fps: float | None = None,
    frame_size: int | None = None,
    progress: bool = True,
) -> ImportSummary:
    """Import an official R²-Tuning cache (``<vid>.npy`` and ``<qid>.npy`` files) into the store ``out``.

    Args:
        dataset: registry name; gives the default fps and the file-name suffix (TACoS ``-cam-002``).
        video_dir: folder of ``<vid>.npy`` files ``(T, k, P, C)``.
        out: store path (created, or resumed when it exists with the same manifest).
        query_dir: folder of ``<qid>.npy`` files ``(L, k, Cq)``.
        annotations: annotation files of ``dataset`` to store alongside.
        backbone, pretrained, weights_sha256: provenance written to the manifest; ``backbone`` is
            any spelling of :mod:`shards.backbones` (``ViT-B/32``), recorded by its canonical name.
        fps: clips per second of the cache (default: the dataset's; per video from the
            annotations for YouTube Highlights).
        frame_size: input resolution; only for a backbone the registry (:mod:`shards.backbones`)
            does not know (the registry gives the others').
        progress: show tqdm bars.
    """
    spec = get_dataset(dataset)
    folder = Path(video_dir)
    if not folder.is_dir():
        raise StoreError(f"video folder {folder} does not exist")
    queries = _load_queries(spec.name, annotations)
    videos = [_npy_item(f, _video_key(f.stem, spec, f)) for f in sorted(folder.glob("*.npy"))]
    query_items: list[_Item] = []
    if query_dir is not None:
        qfolder = Path(query_dir)
        if not qfolder.is_dir():
            raise StoreError(f"query folder {qfolder} does not exist")
        by_name = {str(q.qid): q.qid for q in queries}
        query_items = [_npy_item(f, _query_key(f.stem, by_name)) for f in sorted(qfolder.glob("*.npy"))]
    return _run_import(
        spec=spec,
        videos=videos,
        query_items=query_items,
        queries=queries,
        out=out,
        backbone=backbone,
        pretrained=pretrained,
        weights_sha256=weights_sha256,
        fps=fps,
        frame_size=frame_size,
        progress=progress,
    )


@contextmanager
def _h5_items(
    path: Path, video_group: str, query_group: str | None, queries: Sequence[Query], spec: DatasetSpec
) -> Iterator[tuple[list[_Item], list[_Item]]]:
    try:
        handle = h5py.File(path, "r")
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: not a readable HDF5 file ({err})") from None
    with handle:
        if video_group not in handle or not isinstance(handle[video_group], h5py.Group):
            raise StoreError(f"{path}: has no group {video_group!r}")

        def item(ds: h5py.Dataset, key: int | str) -> _Item:
            return _Item(key, tuple(ds.shape), f"{path}:{ds.name}", lambda: ds[()])

        videos = [
            item(ds, _video_key(name, spec, path))
            for name, ds in sorted(handle[video_group].items())
            if isinstance(ds, h5py.Dataset)
        ]
        query_items: list[_Item] = []
        if query_group and query_group in handle:
            by_name = {str(q.qid): q.qid for q in queries}
            query_items = [
                item(ds, _query_key(name, by_name))
                for name, ds in sorted(handle[query_group].items())
                if isinstance(ds, h5py.Dataset)
            ]
        yield videos, query_items


def import_h5(
    *,
    dataset: str,
    h5_path: str | Path,
    out: str | Path,
    annotations: Sequence[str | Path] = (),
    video_group: str = "/",
    query_group: str | None = "queries",
    backbone: str = "ViT-B-32",
    pretrained: str = "openai",
    weights_sha256: str = "unknown",
    fps: float | None = None,
    frame_size: int | None = None,
    progress: bool = True,
) -> ImportSummary:
    """Import an HDF5 token file into the store ``out``.

    Video datasets ``(T, k, P, C)`` are the datasets directly in ``video_group`` (sub-groups are
    skipped), named by video id; query datasets ``(L, k, Cq)`` are those in ``query_group`` (when
    the file has it), named by query id. Other arguments as :func:`import_npy`.
    """
    spec = get_dataset(dataset)
    path = Path(h5_path)
    if not path.is_file():
        raise StoreError(f"HDF5 file {path} does not exist")
    queries = _load_queries(spec.name, annotations)
    with _h5_items(path, video_group, query_group, queries, spec) as (videos, query_items):
        return _run_import(
            spec=spec,
            videos=videos,
            query_items=query_items,
            queries=queries,
            out=out,
            backbone=backbone,
            pretrained=pretrained,
            weights_sha256=weights_sha256,
            fps=fps,
            frame_size=frame_size,
            progress=progress,
        )
