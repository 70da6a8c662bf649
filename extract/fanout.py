"""Fan the extraction out over dask.distributed workers (several GPUs or hosts), into one store.

Each worker process builds the backbone once (cached in this module, keyed by its settings) and
runs the same pipelined loop as a single process on its share of the videos, writing straight
into the store: the store commits each video with an atomic rename, so disjoint videos can be
written by many processes, or hosts sharing the file system. The driver (the ``r2 extract``
process) creates the store, collects results and failures, and writes queries and annotations;
the text tower also runs on the workers, the driver never loads the model.

With a :class:`~dask.distributed.LocalCluster`, worker ``i`` uses GPU ``i mod #GPUs``
(:func:`shards.device.worker_device`); workers of an external cluster (``--scheduler ADDRESS``) use
the device they are given (e.g. set ``CUDA_VISIBLE_DEVICES`` per worker). Each task makes its device
the current CUDA device (:func:`shards.device.use_device`), so no worker opens a context on GPU 0.
With an external cluster the driver waits (``--worker-timeout``) for a worker, and checks that the
workers see the videos folder, a weights file and the store (every path is sent absolute) before a
video is sent (:mod:`shards.cluster`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from extract.backbone import BackboneInfo, ClipBackbone, WeightsError, load_backbone, warn_random_weights
from extract.config import ExtractConfig, decode_workers
from extract.pipeline import VideoResult, VideoTask, extract_videos
from shards.cluster import absolute, check_visible, connect
from shards.device import dask_worker_device, trial_gpus, use_device, visible_gpus
from shards.errors import R2Error
from shards.store import FeatureStore, open_store

TASKS_PER_WORKER = 4
"""Aim for this many video batches per worker (load balance vs. per-task overhead)."""
MAX_VIDEOS_PER_TASK = 8

_BACKBONES: dict[BackboneSpec, ClipBackbone] = {}


@dataclass(frozen=True)
class BackboneSpec:
    """How a worker builds its backbone (sent to workers; the key of their cache)."""

    arch: str
    pretrained: str
    layers: int
    device: str
    seed: int
    cache_dir: str | None
    precision: str = "fp32"
    token_pool: int = 1


def worker_backbone(spec: BackboneSpec) -> ClipBackbone:
    """The backbone of this worker process, built on first use and kept for later tasks, on this
    worker's device (made the current CUDA device of the calling thread on every call)."""
    device = str(use_device(dask_worker_device(spec.device)))
    backbone = _BACKBONES.get(spec)
    if backbone is None:
        _BACKBONES.clear()
        backbone = load_backbone(**{**asdict(spec), "device": device})
        _BACKBONES[spec] = backbone
    return backbone


def describe_task(spec: BackboneSpec) -> BackboneInfo:
    """Worker task: build (or reuse) the backbone and describe it for the manifest."""
    return worker_backbone(spec).info()


def extract_task(
    spec: BackboneSpec,
    sha256: str,
    store_path: str,
    tasks: list[VideoTask],
    batch_size: int,
    workers: int | None,
    processes: int = 1,
) -> list[VideoResult]:
    """Worker task: extract ``tasks`` into the store at ``store_path`` with this worker's backbone,
    decoding with ``workers`` threads (``None``: this host's cores shared by ``processes`` extracting
    processes, :func:`extract.config.decode_workers`).

    Raises:
        WeightsError: this worker's weights differ from the driver's (another file on this host).
    """
    backbone = worker_backbone(spec)
    if backbone.weights_sha256 != sha256:
        raise WeightsError(
            f"worker weights {backbone.weights_sha256[:12]}… differ from the store's {sha256[:12]}…: every "
            "host must see the same --pretrained weights"
        )
    store = open_store(store_path, mode="a", expect={"weights_sha256": sha256})
    threads = decode_workers(workers, processes=processes)
    return extract_videos(backbone, store, tasks, batch_size=batch_size, workers=threads)


def encode_task(spec: BackboneSpec, texts: list[str]) -> list[np.ndarray]:
    """Worker task: text tokens ``(L_i, k, Cq)`` float16 of ``texts``."""
    return [t.to(torch.float16).cpu().numpy() for t in worker_backbone(spec).encode_texts(texts)]


def split_tasks(tasks: Sequence[VideoTask], workers: int) -> list[list[VideoTask]]:
    """Consecutive groups of videos: about :data:`TASKS_PER_WORKER` per worker, each at most
    :data:`MAX_VIDEOS_PER_TASK` videos."""
    size = max(1, min(MAX_VIDEOS_PER_TASK, math.ceil(len(tasks) / (TASKS_PER_WORKER * max(1, workers)))))
    return [list(tasks[i : i + size]) for i in range(0, len(tasks), size)]


class DaskRunner:
    """Runs the backbone on dask workers: an existing scheduler or a fresh LocalCluster."""

    def __init__(self, cfg: ExtractConfig) -> None:
        from distributed import Client, LocalCluster

        self.cfg = cfg
        self.cluster = None
        self.local_processes = 1  # extracting processes on one host: they share its cores for decoding
        if cfg.scheduler not in (None, "local"):
            self.client = connect(cfg.scheduler, cfg.worker_timeout)
        else:
            workers = cfg.dask_workers or max(1, len(trial_gpus(cfg.device, visible_gpus())))
            self.local_processes = workers
            self.cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            self.client = Client(self.cluster)
        self.spec = BackboneSpec(**cfg.backbone_args())
        try:
            weights = [cfg.pretrained] if Path(cfg.pretrained).is_absolute() else []  # a weights file
            check_visible(self.client, [absolute(cfg.videos), *weights])
            self.info: BackboneInfo = self.client.submit(describe_task, self.spec, pure=False).result()
        except BaseException:
            self.close()
            raise
        if self.info.pretrained.startswith("random:"):
            warn_random_weights(self.info.pretrained)

    def _workers(self) -> int:
        return max(1, len(self.client.scheduler_info(n_workers=-1).get("workers", {})))

    def extract(
        self, store: FeatureStore, tasks: Sequence[VideoTask], on_result: Callable[[VideoResult], None]
    ) -> None:
        """Run the video groups on the workers; a group whose worker died is reported video by video."""
        from distributed import as_completed

        path = str(Path(store.path).resolve())
        check_visible(self.client, [path])
        groups = {
            self.client.submit(
                extract_task,
                self.spec,
                self.info.weights_sha256,
                path,
                group,
                self.cfg.batch_size,
                self.cfg.workers,
                self.local_processes,
                pure=False,
            ): group
            for group in split_tasks(tasks, self._workers())
        }
        for future in as_completed(groups):
            try:
                results = future.result()
            except R2Error:
                raise
            except Exception as err:  # e.g. a worker killed by a crashing decoder or the OOM killer
                results = [
                    VideoResult(t.vid, store.video_length(t.vid))
                    if store.has_video(t.vid)
                    else VideoResult(
                        t.vid, 0, f"{t.path}: the dask worker failed ({type(err).__name__}: {err})"
                    )
                    for t in groups[future]
                ]
            for result in results:
                on_result(result)

    def encode_texts(self, batches: Sequence[list[str]]) -> Iterator[tuple[int, list[np.ndarray]]]:
        from distributed import as_completed

        futures = {
            self.client.submit(encode_task, self.spec, texts, pure=False): i
            for i, texts in enumerate(batches)
        }
        for future in as_completed(futures):
            yield futures[future], future.result()

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
