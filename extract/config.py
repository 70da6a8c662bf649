"""Settings of one extraction run, where the embedded sample lives, and how many threads decode.

Decoding is the ceiling of an extraction on a GPU (one PyAV decoder samples tens to a few hundred
frames per second; the image tower of ViT-B/32 encodes thousands), so by default every core this
process may use decodes: ``workers`` = ``auto`` gives one decoding thread per usable core
(``os.sched_getaffinity``) minus one for the thread that feeds the model, at least 1 and at most
:data:`MAX_DECODE_WORKERS`; an explicit number wins. Each decoder lets FFmpeg use its share of the
cores (:func:`decoder_threads`), so the threads of all decoders add up to about the core count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shards.cluster import DEFAULT_WORKER_TIMEOUT
from shards.device import usable_cores

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
        annotations: annotation files (any splits; one store holds them all).
        out: store directory (created, or resumed when its manifest matches).
        arch: any open_clip ViT config name (``ViT-B-32``, ``ViT-H-14``, ...) or an OpenAI spelling
            (``ViT-B/32``, ``ViT-B/16``, ``ViT-L/14``, ``ViT-L/14@336px``); see :mod:`shards.backbones`.
        pretrained: ``openai``, a weights file, ``random`` or ``random:<seed>``.
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
        progress: show a progress bar on stderr.
        precision: what the CLIP towers compute in: ``fp32`` (default, the reference's numbers) or
            ``fp16`` (autocast: faster on GPUs, tokens drift slightly; see docs/extract.md).
            Tokens are stored as float16 either way; the store records the precision.
    """

    dataset: str
    videos: Path
    annotations: list[Path]
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
    precision: str = "fp32"
    extensions: tuple[str, ...] = field(default=VIDEO_EXTENSIONS)
