"""Validation: predict every query of a split, post-process as the reference does, score.

Queries are run in groups that share a video, a query length and a clip count, so a group needs
no padding and gives exactly the reference's one-query-at-a-time output (padding would change
the TEF, the positional encoding, the conv borders and the max over query tokens). Windows are
clamped to the annotated duration, rounded to the dataset's clip unit and NMS-ed by
:func:`eval.postprocess.postprocess_for`; scores come from :func:`eval.metrics.evaluate`.

Like the reference, which asserts that every annotated query is predicted, validation refuses a
split whose queries lack tokens in the store (:func:`check_predictable`) unless missing queries are
allowed; then it scores the others and reports how many were left out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eval.metrics import evaluate
from eval.postprocess import postprocess_for
from eval.predictions import QueryPrediction
from shards.datasets import DatasetSpec
from shards.errors import StoreError
from shards.schema import Query
from shards.store import FeatureStore
from train.config import RunConfig
from train.data.assembly import Batch
from train.data.batching import per_query_targets
from train.data.loader import LoaderConfig, StreamingLoader
from train.data.sources import TokenSource
from train.model import R2Tuning, decode_sample

log = logging.getLogger(__name__)
_SHOWN_QIDS = 5


@dataclass
class Validation:
    """Result of one validation pass.

    Attributes:
        metrics: flat headline metrics (the evaluator's ``brief`` keys, e.g. ``MR-full-mAP``).
        predictions: one per query, post-processed, in the order the loader served them.
        queries: the ground truth that was scored.
        seconds: wall time of the pass.
        report: the evaluator's whole result (:func:`eval.metrics.evaluate`; ``metrics`` is its
            ``brief`` part), empty when nothing was scored.
    """

    metrics: dict[str, float]
    predictions: list[QueryPrediction]
    queries: list[Query]
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return len(self.predictions) / self.seconds if self.seconds > 0 else 0.0


def _groups(batch: Batch, spec: DatasetSpec) -> dict[tuple[int, int, int], list[int]]:
    """Query positions of ``batch`` keyed by (video row, query length, clips used)."""
    lengths = batch.query_mask.sum(dim=1).tolist()
    rows = batch.video_index.tolist()
    if spec.task == "hd":
        clips = [t.num_clips for t in per_query_targets(batch, spec)]
    else:
        frames = batch.video_mask.sum(dim=1).tolist()
        clips = [int(frames[r]) for r in rows]
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, key in enumerate(zip(rows, lengths, clips, strict=True)):
        groups.setdefault((int(key[0]), int(key[1]), int(key[2])), []).append(i)
    return groups


@torch.inference_mode()
def predict_batch(
    model: R2Tuning, batch: Batch, spec: DatasetSpec, cfg: RunConfig, device: torch.device
) -> list[QueryPrediction]:
    """Post-processed predictions of every query of ``batch`` (same order), model in eval mode.

    Windows are post-processed with ``spec``'s settings (:func:`eval.postprocess.postprocess_for`).
    """
    model.eval()
    layers = cfg.model.layers
    out_preds: list[QueryPrediction | None] = [None] * len(batch)
    for (row, length, clips), members in _groups(batch, spec).items():
        index = torch.tensor(members)
        video = batch.video[row, :clips, -layers:].to(device).float()
        video = video[None].expand(len(members), *video.shape)
        query = batch.query[index, :length, -layers:].to(device).float()
        video_mask = torch.ones(len(members), clips, dtype=torch.bool, device=device)
        query_mask = torch.ones(len(members), length, dtype=torch.bool, device=device)
        out = model(video, video_mask, query, query_mask)
        fps = float(batch.fps[row])
        for j, i in enumerate(members):
            q = batch.queries[i]
            raw, saliency = decode_sample(out, j, fps, cfg.model.max_num_moment, cfg.model.merge_cls_sal)
            windows = None if raw is None else postprocess_for(spec, raw.cpu().numpy(), q.duration)
            out_preds[i] = QueryPrediction(
                qid=q.qid, vid=q.vid, windows=windows, saliency=saliency.double().cpu().numpy(), query=q.text
            )
    return [p for p in out_preds if p is not None]


def flat_metrics(result: dict) -> dict[str, float]:
    """Headline metrics of an evaluator result: its ``brief`` part when it has one, else its numbers."""
    brief = result.get("brief", result)
    return {k: float(v) for k, v in brief.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def validation_loader(
    source: str | Path | TokenSource,
    cfg: RunConfig,
    split: str,
    query_filter: Callable[[Query], bool] | None = None,
    batch_size: int | None = None,
) -> StreamingLoader:
    """Loader over ``split`` in store order, one video at a time, annotations unclamped; its batches hold
    the ``model.layers`` layers the model fuses (gathered on the GPU when ``source`` caches them there)."""
    config = LoaderConfig(
        batch_size=batch_size or cfg.train.batch_size,
        videos_per_batch=1,
        splits=(split,),
        shuffle=False,
        num_workers=0,
        layers=cfg.model.layers,
        read_threads=cfg.train.read_threads,
    )
    return StreamingLoader(source, config, query_filter=query_filter)


def score_predictions(
    dataset: str, predictions: list[QueryPrediction], queries: list[Query], seconds: float
) -> Validation:
    """Score post-processed ``predictions`` against the ground truth ``queries`` of a split.

    ``seconds`` is the wall time the predictions took (for :attr:`Validation.samples_per_s`).
    """
    report = evaluate(dataset, predictions, queries) if predictions else {}
    return Validation(flat_metrics(report), predictions, queries, seconds, report)


def check_predictable(
    store: FeatureStore,
    split: str,
    query_filter: Callable[[Query], bool] | None = None,
    allow_missing: bool = False,
) -> list[Query]:
    """The annotated queries of ``split`` (kept by ``query_filter``) that validation cannot predict:
    their video or their query tokens are not in ``store`` (the validation loader skips them).

    With ``allow_missing`` they are returned and their count is logged as a warning; the others are
    scored. Without it any such query is an error, as in the reference, which asserts that every
    annotated query is predicted.

    Raises:
        StoreError: some queries cannot be predicted and ``allow_missing`` is off; the message names
            the split, the counts, a few qids and the ways out.
    """
    videos = set(store.video_ids())
    annotated = [
        q for q in store.annotations() if q.split == split and (query_filter is None or query_filter(q))
    ]
    no_video = [q for q in annotated if q.vid not in videos]
    no_query = [q for q in annotated if q.vid in videos and not store.has_query(q.qid)]
    missing = no_video + no_query
    if not missing:
        return []
    shown = ", ".join(repr(q.qid) for q in missing[:_SHOWN_QIDS]) + (
        ", ..." if len(missing) > _SHOWN_QIDS else ""
    )
    what = (
        f"{len(missing)} of the {len(annotated)} annotated {split!r} queries of store {store.path} cannot "
        f"be predicted ({len(no_video)} without video tokens, {len(no_query)} without query tokens; "
        f"qids {shown})"
    )
    if not allow_missing:
        raise StoreError(
            f"{what}: the reference scores every annotated query; extract their tokens (r2 extract resumes "
            "a store), or score the others with --allow-missing (r2 eval) or "
            "--set train.allow_missing=true (r2 train)"
        )
    log.warning("%s; scoring the other %d (missing queries allowed)", what, len(annotated) - len(missing))
    return missing

