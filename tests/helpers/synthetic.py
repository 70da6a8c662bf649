"""Synthetic feature stores whose moments can be found: for tests of learning and for benchmarks.

A fixed vocabulary of ``concepts`` pairs a visual direction ``d_c`` (C,) with a text direction ``t_c`` (Cq,).
Every video holds ``queries_per_video`` non-overlapping moments, each of a different concept; the
video tokens are Gaussian noise plus ``signal * d_c`` inside moment c (every layer and token), the
query tokens of moment c are noise plus ``signal * t_c``. A model can only place a query's window by
matching the two directions, and held-out videos (another split) reuse the vocabulary with new
placements, so held-out recall measures learning, not memorisation.

The store is written with :mod:`shards.store`; its manifest records the backbone name and the token
dims of the spec (real ones such as ViT-B-32's for benchmarks, tiny ones for tests), and
:func:`synthetic_run_config` gives the model those dims explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.schema import Query
from shards.store import FeatureStore, create_store, make_manifest
from train.config import RunConfig, apply_overrides, get_preset

SYNTHETIC_FRAME_SIZE = 224
"""Frame size written into the manifest of a synthetic store (nominal: no frames are decoded)."""


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape and content of a synthetic store.

    Attributes:
        n_videos: number of videos (the first ``n_videos - n_heldout`` are ``train``).
        clips: T, clips per video.
        layers: k. tokens: P. width: C. text_width: Cq. query_len: L tokens per query.
        queries_per_video: moments (= queries) per video.
        concepts: size of the concept vocabulary.
        min_len, max_len: moment length range in clips.
        disjoint: moments of one video do not overlap and have distinct concepts (needs
            ``queries_per_video <= concepts`` and room in T); ``False`` places them independently
            (benchmarks with many queries per video).
        fps: clips per second.
        signal: norm of the concept directions added to the unit-variance noise.
        n_heldout: videos of split ``heldout_split``.
        heldout_split: split name of the held-out videos (``val`` or ``test``).
        dataset: dataset registry name written into the manifest and the annotations.
        backbone: manifest backbone name (any name: the dims above are recorded with it).
        seed: everything is drawn from ``numpy.random.default_rng(seed)``.
    """

    n_videos: int
    clips: int = 32
    layers: int = 2
    tokens: int = 2
    width: int = 16
    text_width: int = 16
    query_len: int = 6
    queries_per_video: int = 2
    concepts: int = 8
    min_len: int = 3
    max_len: int = 8
    disjoint: bool = True
    fps: float = 0.5
    signal: float = 3.0
    n_heldout: int = 0
    heldout_split: str = "val"
    dataset: str = "tacos"
    backbone: str = "synthetic-tiny"
    seed: int = 0


def _placements(rng: np.random.Generator, spec: SyntheticSpec) -> list[tuple[int, int]]:
    """``(start, end)`` clip ranges, one per query: non-overlapping in random order when ``spec.disjoint``."""
    lengths = rng.integers(spec.min_len, spec.max_len + 1, size=spec.queries_per_video)
    if not spec.disjoint:
        starts = rng.integers(0, spec.clips - lengths + 1)
        return [(s, s + n) for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]
    free = spec.clips - int(lengths.sum())
    if free < 0:
        raise ValueError(
            f"{spec.queries_per_video} moments of up to {spec.max_len} clips do not fit in {spec.clips} clips"
        )
    gaps = np.diff(np.sort(rng.integers(0, free + 1, size=spec.queries_per_video)), prepend=0)
    spans, cursor = [], 0
    for gap, length in zip(gaps.tolist(), lengths.tolist(), strict=True):
        cursor += gap
        spans.append((cursor, cursor + length))
        cursor += length
    order = rng.permutation(len(spans))
    return [spans[i] for i in order]


def _unit_rows(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    x = rng.standard_normal((rows, width)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_synthetic_store(path: str | Path, spec: SyntheticSpec) -> FeatureStore:
    """Write a synthetic store at ``path`` (must not exist or be empty) and return it.

    Video ``vid{i:05d}`` holds tokens (T, k, P, C) float16; query ids are ints ``i * queries_per_video + j``;
    annotations carry the moments in seconds, duration ``T / fps`` and the split.
    """
    if spec.disjoint and spec.queries_per_video > spec.concepts:
        raise ValueError("disjoint moments need queries_per_video <= concepts (one concept per moment)")
    rng = np.random.default_rng(spec.seed)
    video_dirs = _unit_rows(rng, spec.concepts, spec.width) * spec.signal
    text_dirs = _unit_rows(rng, spec.concepts, spec.text_width) * spec.signal
    manifest = make_manifest(
        dataset=spec.dataset,
        backbone=spec.backbone,
        pretrained=f"random:{spec.seed}",
        weights_sha256=f"synthetic-{spec.seed}",
        layers=spec.layers,
        frame_size=SYNTHETIC_FRAME_SIZE,
        fps=spec.fps,
        video_tokens=spec.tokens,
        video_width=spec.width,
        text_width=spec.text_width,
    )
    store = create_store(path, manifest, fsync=False)
    queries: list[Query] = []
    qids: list[int] = []
    tokens: list[np.ndarray] = []
    duration = spec.clips / spec.fps
    for i in range(spec.n_videos):
        vid = f"vid{i:05d}"
        split = "train" if i < spec.n_videos - spec.n_heldout else spec.heldout_split
        video = rng.standard_normal((spec.clips, spec.layers, spec.tokens, spec.width), dtype=np.float32)
        concepts = rng.choice(spec.concepts, size=spec.queries_per_video, replace=not spec.disjoint)
        spans = _placements(rng, spec)
        for j, ((start, end), concept) in enumerate(zip(spans, concepts.tolist(), strict=True)):
            video[start:end] += video_dirs[concept]
            text = rng.standard_normal((spec.query_len, spec.layers, spec.text_width), dtype=np.float32)
            qid = i * spec.queries_per_video + j
            qids.append(qid)
            tokens.append((text + text_dirs[concept]).astype(np.float16))
            queries.append(
                Query(vid=vid, qid=qid, text=f"concept {concept}", duration=duration, split=split,
                      moments=[[start / spec.fps, end / spec.fps]])
            )
        store.write_video(vid, video.astype(np.float16), spec.fps)
    store.write_queries(qids, tokens)
    store.write_annotations(queries)
    return store


def synthetic_run_config(
    spec: SyntheticSpec, preset: str = "tacos", overrides: Sequence[str] = ()
) -> RunConfig:
    """Preset ``preset`` adapted to a synthetic store of ``spec`` (backbone, token dims, layers,
    validation on its held-out videos, none without them), then ``overrides``."""
    fitted = [
        f"train.val_split={spec.heldout_split if spec.n_heldout else 'none'}",
        f"model.video_tokens={spec.tokens}",
        f"model.video_width={spec.width}",
        f"model.text_width={spec.text_width}",
        f"model.layers={spec.layers}",
    ]
    return apply_overrides(get_preset(preset, arch=spec.backbone), [*fitted, *overrides])
