"""The data side of a training run: which queries it trains and validates on, its loaders, and the
batches of each epoch.

:func:`open_run_data` opens the store for a config (checking that the config fits it and taking its
token dims), picks the training queries as the reference filters them and the validation split, and
builds the loaders. :func:`epoch_inputs` yields the model inputs of one epoch; their order and the
positive-clip draws are pure functions of (seed, epoch), so a resumed run and a shared sweep pass see
the batches a fresh run sees. On CUDA each batch is moved to the GPU on a side stream while the
previous step runs on the current one (:func:`side_stream_batches`); on the CPU it is used in line.

The loaders and the token cache read only the ``model.layers`` layers the model fuses, and their host
batches are copied by ``train.read_threads`` threads into pinned memory when training on a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.datasets import DatasetSpec, get_dataset
from shards.device import use_device
from shards.errors import ConfigError
from shards.schema import Query
from shards.store import FeatureStore, Manifest, open_store
from train.compat import config_for_store
from train.config import RunConfig
from train.data.assembly import Batch
from train.data.batching import ModelInputs, model_inputs
from train.data.cache import TokenCache, needed_bytes, plan_cache
from train.data.loader import LoaderConfig, StreamingLoader
from train.data.targets import query_targets
from train.data.uniform import UniformLoader
from train.engine.evaluate import check_predictable, validation_loader
from train.engine.memory import estimate_step, store_extent
from train.engine.records import run_provenance
from train.engine.runlog import RunPaths, write_json_atomic
from train.engine.schedule import steps_per_epoch

log = logging.getLogger(__name__)

TrainLoader = UniformLoader | StreamingLoader
"""The training loader: uniform batches (default) or the pooled streaming loader."""

MIN_TRAIN_VIDEO_SECONDS = 5.0
"""Moment-retrieval training skips videos shorter than this (reference ``min_video_len``)."""


class _TrainableQueries:
    """Loader query filter: membership in the ids of :func:`trainable_queries` (picklable for workers)."""

    def __init__(self, keep: set) -> None:
        self.keep = keep

    def __call__(self, query: Query) -> bool:
        return query.qid in self.keep


def domain_filter(cfg: RunConfig) -> Callable[[Query], bool] | None:
    """Keep only the queries of ``cfg.domain`` (YouTube Highlights / TVSum presets), else ``None``."""
    if not cfg.domain:
        return None
    domain = cfg.domain.lower()
    return lambda q: (q.domain or "").lower() == domain


def trainable_queries(store: FeatureStore, cfg: RunConfig, split: str) -> set:
    """Ids of the ``split`` queries that can be trained on (as the reference filters its train set)."""
    spec = get_dataset(cfg.dataset)
    in_domain = domain_filter(cfg)
    videos = set(store.video_ids())
    keep = set()
    for q in store.annotations():
        if q.split != split or q.vid not in videos or (in_domain is not None and not in_domain(q)):
            continue
        if spec.task == "mr" and q.duration < MIN_TRAIN_VIDEO_SECONDS:
            continue
        targets = query_targets(q, store.video_length(q.vid), store.video_fps(q.vid), spec)
        if len(targets.positives):
            keep.add(q.qid)
    return keep


def choose_val_split(store: FeatureStore, cfg: RunConfig) -> str | None:
    """``cfg.train.val_split`` if set, else ``val`` when the store has such queries, else ``test``, else
    ``None`` (queries outside ``cfg.domain`` do not count).

    Raises:
        ConfigError: ``cfg.train.val_split`` names a split the store has no queries of.
    """
    in_domain = domain_filter(cfg)
    present = {q.split for q in store.annotations() if in_domain is None or in_domain(q)}
    wanted = cfg.train.val_split
    if wanted is None:
        return next((s for s in ("val", "test") if s in present), None)
    if wanted not in present:
        raise ConfigError(
            f"train.val_split is {wanted!r} but the store has no such queries"
            + (f" of domain {cfg.domain!r}" if cfg.domain else "")
            + f" (its splits: {', '.join(sorted(present)) or 'none'}); set train.val_split to one of them"
        )
    return wanted


def token_cache(
    store: FeatureStore,
    cfg: RunConfig,
    keep: set,
    val_split: str | None,
    device: torch.device,
    extent: tuple[int, int],
) -> TokenCache:
    """The run's token cache (``train.cache``, ``train.cache_gb``), sized for the trainable queries
    ``keep`` and the ``val_split`` queries, leaving the GPU room for a step on batches padded to
    ``extent`` (longest video in clips, longest query in tokens: :func:`train.engine.memory.store_extent`);
    says where the tokens live in one log line."""
    in_domain = domain_filter(cfg)
    videos = set(store.video_ids())
    used = [
        q for q in store.annotations()
        if q.qid in keep
        or (q.split == val_split and q.vid in videos and store.has_query(q.qid)
            and (in_domain is None or in_domain(q)))
    ]
    layers = cfg.model.layers
    step = estimate_step(cfg, *extent, device_type="cuda").total if device.type == "cuda" else 0
    plan = plan_cache(cfg.train.cache, cfg.train.cache_gb, needed_bytes(store, used, layers), device, step)
    log.info(plan.describe())
    return TokenCache(store, plan, layers)


def train_loader(
    store_path: str | Path, cache: TokenCache, cfg: RunConfig, split: str, keep: set, pin: bool
) -> TrainLoader:
    """Shuffled loader over the trainable queries of ``split``: the reference's uniform batches
    (``train.batching=uniform``) read through ``cache``, or the pooled streaming loader (``pooled``),
    which says once when its memory bound (``train.loader_memory_gb``) cuts batches. Either runs in this
    process when the cache holds tokens (``train.num_workers`` then only serves streamed reads)."""
    if cfg.train.batching == "uniform":
        return UniformLoader(
            cache,
            store_path,
            cfg.train.batch_size,
            repeat=cfg.train.repeat,
            seed=cfg.train.seed,
            splits=(split,),
            query_filter=_TrainableQueries(keep),
            num_workers=cfg.train.num_workers,
            pin_memory=pin,
            verify_reads=cfg.train.verify_reads,
            layers=cfg.model.layers,
            read_threads=cfg.train.read_threads,
        )
    config = LoaderConfig(
        batch_size=cfg.train.batch_size,
        videos_per_batch=cfg.train.pool_size,
        splits=(split,),
        shuffle=True,
        seed=cfg.train.seed,
        num_workers=cfg.train.num_workers if cache.plan.mode == "off" else 0,
        max_bytes=int(cfg.train.loader_memory_gb * 2**30),
        verify_reads=cfg.train.verify_reads,
        layers=cfg.model.layers,
        read_threads=cfg.train.read_threads,
    )
    source = store_path if cache.plan.mode == "off" else cache
    return StreamingLoader(source, config, _TrainableQueries(keep), pin_memory=pin, report_cuts=True)


@dataclass
class RunData:
    """The data side of a run: what it reads, from where, onto which device. The sweep's shared pass
    makes one for the K models that share it.

    Attributes:
        store_path: the feature store.
        manifest: its manifest.
        identity: the manifest fields checkpoints record (:meth:`shards.manifest.Manifest.identity`).
        spec: the dataset.
        device: where batches go.
        train_split: split trained on.
        val_split: split validated on (``None``: no validation).
        loader: shuffled loader over the trainable queries of ``train_split``.
        val_loader: loader over ``val_split`` (``None`` without validation or without queries).
        val_missing: annotated ``val_split`` queries without tokens, left out (``train.allow_missing``).
        extent: (T, L) the store's longest video in clips and longest query in tokens, read once
            (:func:`train.engine.memory.store_extent`; the step's memory estimate uses them).
    """

    store_path: str | Path
    manifest: Manifest
    identity: dict[str, Any]
    spec: DatasetSpec
    device: torch.device
    train_split: str
    val_split: str | None
    loader: TrainLoader
    val_loader: StreamingLoader | None
    val_missing: int = 0
    extent: tuple[int, int] = (1, 1)

    def steps_per_epoch(self, cfg: RunConfig) -> int:
        """Optimizer steps of one epoch (:func:`train.engine.schedule.steps_per_epoch`)."""
        return steps_per_epoch(self.loader.num_queries, cfg)

    def write_run_info(self, paths: RunPaths, cfg: RunConfig, amp: bool) -> None:
        """Write ``config.json`` (the resolved ``cfg``) and ``run.json`` (store, splits, seed, device,
        AMP, and the process: command line, package version, git revision, start and resume times,
        :func:`train.engine.records.run_provenance`; the end time is added when the run ends)."""
        provenance = run_provenance(paths)
        write_json_atomic(paths.config, cfg.to_dict())
        write_json_atomic(paths.run, {
            "store": str(Path(self.store_path).resolve()),
            "manifest": self.manifest.to_attrs(),
            "train_split": self.train_split,
            "val_split": self.val_split,
            "train_queries": self.loader.num_queries,
            "seed": cfg.train.seed,
            "device": str(self.device),
            "amp": amp,
            **provenance,
        })


def open_run_data(cfg: RunConfig, store_path: str | Path, device: str) -> tuple[RunConfig, RunData]:
    """Open the store for ``cfg`` and select the data of the run.

    Returns:
        ``cfg`` with the store's token dims (:func:`train.compat.config_for_store`), and the data.

    Raises:
        StoreError: missing store, one that does not fit ``cfg``, or annotated validation queries without
            tokens (unless ``train.allow_missing``).
        ConfigError: unknown device, no trainable queries in ``train.train_split``, or a
            ``train.val_split`` the store does not have.
    """
    store = open_store(store_path, verify_reads=cfg.train.verify_reads)
    cfg = config_for_store(cfg, store.manifest, store_path)
    torch_device = use_device(device)
    split = cfg.train.train_split
    keep = trainable_queries(store, cfg, split)
    if not keep:
        raise ConfigError(
            f"store {store_path} has no trainable queries in split {split!r}"
            + (f" of domain {cfg.domain!r}" if cfg.domain else "")
            + "; check train.train_split and the annotations"
        )
    val_split = choose_val_split(store, cfg)
    extent = store_extent(store)
    cache = token_cache(store, cfg, keep, val_split, torch_device, extent)
    val_loader, val_missing = None, 0
    if val_split is not None:
        val_missing = len(check_predictable(store, val_split, domain_filter(cfg), cfg.train.allow_missing))
        val_loader = validation_loader(cache, cfg, val_split, query_filter=domain_filter(cfg))
        val_loader = val_loader if val_loader.num_queries else None
    data = RunData(
        store_path=store_path,
        manifest=store.manifest,
        identity=store.manifest.identity(),
        spec=get_dataset(cfg.dataset),
        device=torch_device,
        train_split=split,
        val_split=val_split,
        loader=train_loader(store_path, cache, cfg, split, keep, pin=torch_device.type == "cuda"),
        val_loader=val_loader,
        val_missing=val_missing,
        extent=extent,
    )
    return cfg, data


def pos_clip_generator(seed: int, pass_index: int) -> torch.Generator:
    """Generator of the positive-clip draws of one pass over the data, a pure function of its arguments."""
    state = np.random.SeedSequence([seed, pass_index, 7]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def side_stream_batches(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """``batches`` with their tokens moved to ``device`` on a side CUDA stream (the loader's gathers and
    the host-to-device copies of the tokens run there), so that a batch's transfer overlaps the step still
    running on the current stream; the current stream waits for it before the batch is handed over, and
    the allocator is told the tokens are used there (``record_stream``), so their memory is not reused
    early. Only the loader's float16 tokens are staged ahead: the float32 model inputs are built from
    them on the current stream (:func:`train.data.batching.model_inputs`), after the step before has
    freed its own; masks, index and rates stay on the host, where the targets are computed from them
    without reading the GPU. On the CPU: ``batches`` as they are."""
    if device.type != "cuda":
        yield from batches
        return
    side = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)
    while True:
        with torch.cuda.stream(side):
            batch = next(batches, None)
            if batch is None:
                return
            batch = batch.tokens_to(device, non_blocking=True)
        main.wait_stream(side)
        for tensor in (batch.video, batch.query):
            tensor.record_stream(main)
        yield batch


def epoch_inputs(
    loader: TrainLoader, cfg: RunConfig, spec: DatasetSpec, device: torch.device, epoch: int
) -> Iterator[tuple[ModelInputs, int]]:
    """Model inputs of every batch of 0-based ``epoch`` with the number of queries in the batch: one
    pass of a :class:`UniformLoader` (it repeats the queries itself), ``cfg.train.repeat`` passes of the
    pooled loader. The order and the positive-clip draws depend on (seed, pass) only. On CUDA the
    next batch is moved to the GPU on a side stream while the step runs (:func:`side_stream_batches`)."""
    passes = 1 if isinstance(loader, UniformLoader) else cfg.train.repeat
    for r in range(passes):
        pass_index = epoch * passes + r
        loader.set_epoch(pass_index)
        generator = pos_clip_generator(cfg.train.seed, pass_index)
        for batch in side_stream_batches(iter(loader), device):
            yield model_inputs(batch, spec, cfg.model.layers, device, generator), len(batch)
