"""Registry of the supported datasets and their fixed properties.

Numbers follow the R²-Tuning reference configs (frame rate of the cached features, rounding
unit of predicted windows, NMS used at evaluation). Annotation parsing lives in
:mod:`shards.annotations`; see ``docs/datasets.md`` for the expected data layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from shards.errors import UnknownDatasetError


@dataclass(frozen=True)
class DatasetSpec:
    """Fixed properties of one dataset.

    Attributes:
        name: registry key: ``qvhighlights`` | ``charades`` | ``tacos`` | ``ego4d`` | ``youtube`` | ``tvsum``
            | ``custom`` (one's own videos: docs/custom-data.md).
        title: human-readable name, e.g. ``Charades-STA``.
        fps: frames per second sampled for the features; ``None`` = per-video rate from the
            annotation (``auto``, YouTube Highlights: :attr:`shards.schema.Query.fps`).
        clip_unit: rounding unit in seconds of predicted windows at evaluation (QVHighlights 2.0,
            Charades-STA 0.1), ``None`` = no rounding.
        video_suffix: appended to the video id to form the file name (``-cam-002`` for TACoS).
        splits: splits that have annotation files.
        domains: YouTube Highlights / TVSum domains, else ``()``.
        task: ``mr`` (moment retrieval; QVHighlights also has highlight labels) or ``hd``
            (highlight detection only: YouTube Highlights, TVSum).
        aliases: other accepted names (lower case).
        nms_mode: NMS of predicted windows at evaluation: ``normal`` (drop overlaps above
            :attr:`nms_thres`), ``linear`` (scale scores by ``1 - IoU``), ``None`` for ``hd``.
        nms_thres: IoU threshold of ``normal`` NMS, else ``None``.
        key_metric: metric that ranks checkpoints (key of the evaluator's result dict).
        longest_clips: approximate longest video in clips at the feature rate, for plans made without
            a store (``r2 train --dry-run``'s memory estimate; a store gives the real value):
            QVHighlights 150 s at 0.5 fps; Ego4D-NLQ 8-minute clips; the others rounded up from their
            longest videos; ``custom`` as QVHighlights.
        evaluator: which official metrics score it (:func:`eval.metrics.evaluate`): ``qvhighlights``
            (moment mAP and recall, highlight metrics when saliency is annotated), ``grounding``
            (recall at IoU thresholds), ``youtube`` or ``tvsum`` (highlight mAP per domain).
    """

    name: str
    title: str
    fps: float | None
    clip_unit: float | None
    video_suffix: str
    splits: tuple[str, ...]
    domains: tuple[str, ...]
    task: str
    aliases: tuple[str, ...]
    nms_mode: str | None
    nms_thres: float | None
    key_metric: str
    longest_clips: int
    evaluator: str = "grounding"

    @property
    def clip_seconds(self) -> float | None:
        """Length of one feature clip in seconds (``1 / fps``); ``None`` when fps is per video."""
        return None if self.fps is None else 1.0 / self.fps


_SPECS: tuple[DatasetSpec, ...] = (
    DatasetSpec(
        name="qvhighlights",
        title="QVHighlights",
        fps=0.5,
        clip_unit=2.0,
        video_suffix="",
        splits=("train", "val", "test"),
        domains=(),
        task="mr",
        aliases=("qvh", "qvhighlight"),
        nms_mode="normal",
        nms_thres=0.7,
        longest_clips=75,
        key_metric="MR-full-mAP",
        evaluator="qvhighlights",
    ),
    DatasetSpec(
        name="charades",
        title="Charades-STA",
        fps=1.0,
        clip_unit=0.1,
        video_suffix="",
        splits=("train", "test"),
        domains=(),
        task="mr",
        aliases=("charades-sta", "charades_sta", "charadessta"),
        nms_mode="linear",
        nms_thres=None,
        longest_clips=200,
        key_metric="MR-full-R1@0.5",
    ),
    DatasetSpec(
        name="tacos",
        title="TACoS",
        fps=0.5,
        clip_unit=None,
        video_suffix="-cam-002",
        splits=("train", "val", "test"),
        domains=(),
        task="mr",
        aliases=(),
        nms_mode="linear",
        nms_thres=None,
        longest_clips=500,
        key_metric="MR-full-R1@0.5",
    ),
    DatasetSpec(
        name="ego4d",
        title="Ego4D-NLQ",
        fps=0.5,
        clip_unit=None,
        video_suffix="",
        splits=("train", "val"),
        domains=(),
        task="mr",
        aliases=("ego4d-nlq", "ego4d_nlq", "nlq"),
        nms_mode="linear",
        nms_thres=None,
        longest_clips=240,
        key_metric="MR-full-R1@0.5",
    ),
    DatasetSpec(
        name="youtube",
        title="YouTube Highlights",
        fps=None,
        clip_unit=None,
        video_suffix="",
        splits=("train", "val"),
        domains=("dog", "gymnastics", "parkour", "skating", "skiing", "surfing"),
        task="hd",
        aliases=("youtube-highlights", "youtube_highlights", "youtube_highlight", "youtube-highlight", "yt"),
        nms_mode=None,
        nms_thres=None,
        longest_clips=100,
        key_metric="mAP",
        evaluator="youtube",
    ),
    DatasetSpec(
        name="tvsum",
        title="TVSum",
        fps=0.5,
        clip_unit=None,
        video_suffix="",
        splits=("train", "val"),
        domains=("BK", "BT", "DS", "FM", "GA", "MS", "PK", "PR", "VT", "VU"),
        task="hd",
        aliases=(),
        nms_mode=None,
        nms_thres=None,
        longest_clips=330,
        key_metric="mAP",
        evaluator="tvsum",
    ),
    DatasetSpec(
        name="custom",
        title="custom",
        fps=0.5,
        clip_unit=None,
        video_suffix="",
        splits=("train", "val", "test"),
        domains=(),
        task="mr",
        aliases=(),
        nms_mode="normal",
        nms_thres=0.7,
        longest_clips=75,
        key_metric="MR-full-mAP",
        evaluator="qvhighlights",
    ),
)

_BY_NAME: dict[str, DatasetSpec] = {s.name: s for s in _SPECS}
_LOOKUP: dict[str, DatasetSpec] = {key: s for s in _SPECS for key in (s.name, *s.aliases)}


def dataset_names() -> list[str]:
    """Registry names of all supported datasets, in a fixed order."""
    return list(_BY_NAME)


def get_dataset(name: str) -> DatasetSpec:
    """The spec of dataset ``name`` (case-insensitive; aliases such as ``qvh``, ``charades-sta`` work).

    Raises:
        UnknownDatasetError: the name is not in the registry; the message lists the valid names.
    """
    spec = _LOOKUP.get(name.strip().lower())
    if spec is None:
        raise UnknownDatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}")
    return spec


def video_filename_stem(spec: DatasetSpec, vid: str) -> str:
    """File name of video ``vid`` without extension: ``vid + spec.video_suffix``.

    ``vid`` is the id as stored in :class:`shards.schema.Query` (checked by the annotation
    parser), e.g. TACoS ``s34-d28`` → ``s34-d28-cam-002``.
    """
    return vid + spec.video_suffix
