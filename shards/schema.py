"""The normalized annotation schema shared by every dataset.

All times are in **seconds**. Parsers in :mod:`shards.annotations` turn each dataset's
files into a list of :class:`Query`; the store keeps them and the trainer, evaluator and
importers read them back from there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Query:
    """One (video, sentence) pair with its ground truth.

    Attributes:
        vid: video id as written in the annotation file (store key; TACoS without ``-cam-002``).
        qid: query id, unique within a store (ints are kept as ints).
        text: the sentence (``title`` for YouTube Highlights / TVSum).
        duration: video duration in seconds, from the annotation.
        split: ``train`` / ``val`` / ``test``.
        moments: ground-truth windows ``[[start, end], ...]`` in seconds (empty for HD-only data).
        saliency: per-clip saliency, dataset specific:
            QVHighlights: ``{"clip_ids": [...], "scores": [[a, b, c], ...]}`` (2-s clips, 3 workers, 0..4);
            YouTube Highlights: ``{"match": [...]}`` one value in {-1, 0, 1} per annotated clip;
            TVSum: ``{"scores": [[20 annotators], ...]}`` per 2-s clip, values 1..5;
            ``None`` when the dataset has no saliency labels.
        domain: YouTube Highlights / TVSum domain (e.g. ``dog``, ``BK``), else ``None``.
        fps: per-video sampling rate the annotation asks for (YouTube Highlights), else ``None``.
    """

    vid: str
    qid: int | str
    text: str
    duration: float
    split: str
    moments: list[list[float]] = field(default_factory=list)
    saliency: dict[str, Any] | None = None
    domain: str | None = None
    fps: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Query:
        return cls(**d)
