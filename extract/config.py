"""Settings of one extraction run, what it reads, where the embedded sample lives, and how many
threads decode.

What a run reads is settled here, before the model is loaded (nothing in this module imports torch
or open_clip), so a user error — an unknown dataset, a missing or malformed annotation file, a
duplicate query id — stops the command within a second: :func:`check_options` and
:func:`read_inputs` (the annotation files ``--annotations`` names, their queries, and for the
``custom`` dataset the length of every video whose records give no ``duration``, read from the video
file's metadata).

Decoding is the ceiling of an extraction on a GPU (one PyAV decoder samples tens to a few hundred
frames per second; the image tower of ViT-B/32 encodes thousands), so by default every core this
process may use decodes: ``workers`` = ``auto`` gives one decoding thread per usable core
(``os.sched_getaffinity``) minus one for the thread that feeds the model, at least 1 and at most
:data:`MAX_DECODE_WORKERS`; an explicit number wins. Each decoder lets FFmpeg use its share of the
cores (:func:`decoder_threads`), so the threads of all decoders add up to about the core count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extract.frames import video_duration
from shards.annotation_files import Selection, resolve_annotation_args
from shards.annotations import load_many
from shards.backbones import get_backbone
from shards.cluster import DEFAULT_WORKER_TIMEOUT
from shards.datasets import DatasetSpec, get_dataset, video_filename_stem
from shards.device import usable_cores
from shards.errors import AnnotationError, ConfigError, VideoError
from shards.manifest import pooled_tokens
from shards.quant import check_dtype
from shards.schema import Query

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
"""File extensions tried, in this order, for ``<videos>/<vid><suffix><ext>``."""

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
"""The embedded sample: two short real videos and Charades-STA-style annotations (see its README)."""
SAMPLE_DATASET = "charades"
MAX_DECODE_WORKERS = 32
"""Most decoding threads ``auto`` gives one process: past this, the threads contend for Python's GIL
(their per-frame Python work); more processes (``--dask-workers``) scale further."""


def decode_workers(requested: int | None, processes: int = 1) -> int:
    """Decoding threads of one extracting process: ``requested`` when given, else (``auto``) the
    usable cores shared by ``processes`` extracting processes on this host, minus one per process
    for the thread that feeds the model, clamped to ``1..MAX_DECODE_WORKERS``."""
    if requested is not None:
        return requested
    return max(1, min(MAX_DECODE_WORKERS, usable_cores() // max(1, processes) - 1))


def decoder_threads(decoders: int) -> int:
    """FFmpeg threads of each of ``decoders`` concurrent decoders: their share of the usable cores
    (at least 1), so that several decoders do not oversubscribe the machine."""
    return max(1, usable_cores() // max(1, decoders))


def sample_paths() -> tuple[Path, list[Path]]:
    """``(videos_dir, [train_file, test_file])`` of the embedded sample (dataset :data:`SAMPLE_DATASET`)."""
    return SAMPLE_DIR, [SAMPLE_DIR / "charades_sample_train.jsonl", SAMPLE_DIR / "charades_sample_test.jsonl"]


@dataclass
class ExtractConfig:
    """Everything :func:`extract.job.run_extraction` needs.

    Attributes:
        dataset: registry name (``charades``, ``qvhighlights``, ... see :mod:`shards.datasets`).
        videos: folder holding ``<vid><suffix>.<ext>`` files.
        annotations: ``--annotations`` values: annotation files, ``FILE:SPLIT``, or folders (one file
            per split: :func:`shards.annotation_files.resolve_annotation_args`); any splits, one store
            holds them all.
        out: store directory (created, or resumed when its manifest matches).
        arch: any open_clip ViT config name (``ViT-B-32``, ``ViT-H-14``, ...) or an OpenAI spelling
            (``ViT-B/32``, ``ViT-B/16``, ``ViT-L/14``, ``ViT-L/14@336px``); see :mod:`shards.backbones`.
        pretrained: a tag of open_clip's for ``arch`` (``openai``, ``webli``, ``merged2b_s8b_b131k`` ...),
            a weights file, ``random`` or ``random:<seed>``.
        fps: frames per second; ``None`` = the dataset's rate (per video from the annotations
            when the dataset has none, e.g. YouTube Highlights).
        layers: k, last blocks kept from each tower.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        batch_size: frames per forward pass of the image tower.
        query_batch_size: sentences per forward pass of the text tower.
        workers: decoding threads, each decoding one video at a time; ``None`` (``auto``) = one per
            usable core minus one, 1..:data:`MAX_DECODE_WORKERS` (:func:`decode_workers`).
        scheduler: dask scheduler address for a fan-out over an existing cluster, ``local`` for a
            :class:`dask.distributed.LocalCluster`, ``None`` = in-process (a LocalCluster with one
            worker per GPU is started automatically when several GPUs are visible).
        dask_workers: worker processes of the LocalCluster (default: one per GPU).
        worker_timeout: seconds to wait for the first worker of the ``scheduler`` cluster.
        limit: only the first N videos of the annotations (and their queries).
        seed: seed of random weights.
        cache_dir: where to look for / download OpenAI weights (default: Hugging Face cache).
        progress: show the progress on stderr: a bar on a terminal, else (batch jobs) a log line every
            ``progress_interval`` seconds.
        progress_interval: seconds between two progress lines when stderr is not a terminal.
        precision: what the CLIP towers compute in: ``fp32`` (default, the reference's numbers) or
            ``fp16`` (autocast: faster on GPUs, tokens drift slightly; see docs/extract.md).
            Tokens are stored as ``dtype`` either way; the store records the precision.
        token_pool: N: the patch grid of every frame is average-pooled N x N at extraction (token 0
            kept), so a frame has ``(grid / N)² + 1`` tokens; 1 = no pooling. N must divide the grid
            (:func:`shards.manifest.pooled_tokens`).
        dtype: how the store keeps the tokens, one of :data:`shards.quant.DTYPES` (``float16``, or
            ``int8`` with a per-token scale, dequantized on read).
    """

    dataset: str
    videos: Path
    annotations: list[str | Path]
    out: Path
    arch: str = "ViT-B-32"
    pretrained: str = "openai"
    fps: float | None = None
    layers: int = 4
    device: str = "auto"
    batch_size: int = 32
    query_batch_size: int = 64
    workers: int | None = None
    scheduler: str | None = None
    dask_workers: int | None = None
    worker_timeout: float = DEFAULT_WORKER_TIMEOUT
    limit: int | None = None
    seed: int = 0
    cache_dir: str | None = None
    progress: bool = True
    progress_interval: float = 30.0
    precision: str = "fp32"
    token_pool: int = 1
    dtype: str = "float16"
    extensions: tuple[str, ...] = field(default=VIDEO_EXTENSIONS)

    def backbone_args(self) -> dict[str, Any]:
        """The arguments of :func:`extract.backbone.load_backbone` this config asks for (also what a
        dask worker builds its backbone from)."""
        return {
            "arch": self.arch,
            "pretrained": self.pretrained,
            "layers": self.layers,
            "device": self.device,
            "seed": self.seed,
            "cache_dir": self.cache_dir,
            "precision": self.precision,
            "token_pool": self.token_pool,
        }


def find_video(folder: Path, stem: str, extensions: Sequence[str]) -> Path | None:
    """The first existing ``folder/<stem><ext>`` over ``extensions`` (lower, then upper case)."""
    for ext in extensions:
        for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def check_options(cfg: ExtractConfig) -> DatasetSpec:
    """Refuse settings that cannot work before anything is read or loaded; returns the dataset's spec.

    Raises:
        UnknownDatasetError, ConfigError (unknown backbone, a count below 1, a rate not above 0, a
        token pool that does not divide the backbone's patch grid, an unknown token dtype),
        VideoError (no videos folder).
    """
    spec = get_dataset(cfg.dataset)
    backbone = get_backbone(cfg.arch)  # an unknown backbone fails before a worker starts or a video is read
    pooled_tokens(backbone.video_tokens, cfg.token_pool, backbone.name)
    check_dtype(cfg.dtype)
    if not cfg.videos.is_dir():
        raise VideoError(f"videos folder {cfg.videos} does not exist (pass --videos DIR)")
    for name in ("batch_size", "query_batch_size", "workers", "layers", "limit"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if cfg.fps is not None and not cfg.fps > 0:
        raise ConfigError(f"fps must be positive or 'auto', got {cfg.fps}")
    if cfg.progress_interval < 0:
        raise ConfigError(f"progress_interval must be at least 0 seconds, got {cfg.progress_interval:g}")
    return spec


@dataclass
class ExtractInputs:
    """What a run reads: the annotation files chosen and their queries (of the first ``limit`` videos)."""

    selection: Selection
    queries: list[Query]


def read_inputs(cfg: ExtractConfig) -> ExtractInputs:
    """Check the options (:func:`check_options`), choose the annotation files and parse them.

    Records of the ``custom`` dataset without ``duration`` get the length of their video, read from the
    file's metadata (:func:`extract.frames.video_duration`) in ``cfg.videos`` as extraction finds it.

    Raises:
        the errors of :func:`check_options`; AnnotationError (bad file or record, duplicate query id, or a
        ``custom`` record without ``duration`` whose video is missing); VideoError (such a video whose
        length cannot be read).
    """
    spec = check_options(cfg)
    selection = resolve_annotation_args(list(cfg.annotations), spec.name)
    files = [str(path) if split is None else f"{path}:{split}" for path, split in selection.files]
    queries = load_many(spec.name, files, durations=_video_durations(spec, cfg))
    return ExtractInputs(selection, limit_queries(queries, cfg.limit))


def _video_durations(spec: DatasetSpec, cfg: ExtractConfig) -> Callable[[str], float]:
    """``vid -> seconds`` read from the video file (each file once), for records without ``duration``."""
    known: dict[str, float] = {}

    def duration(vid: str) -> float:
        if vid not in known:
            stem = video_filename_stem(spec, vid)
            path = find_video(cfg.videos, stem, cfg.extensions)
            if path is None:
                raise AnnotationError(
                    f"video {vid!r} has no 'duration' in the annotations and there is no "
                    f"{stem}{{{','.join(cfg.extensions)}}} in {cfg.videos} to read it from; add the video "
                    "or a 'duration' field (seconds) to its lines"
                )
            try:
                known[vid] = video_duration(path)
            except VideoError as err:
                raise VideoError(
                    f"cannot read the length of video {vid!r}, whose lines give no 'duration': {err}"
                ) from None
        return known[vid]

    return duration


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
