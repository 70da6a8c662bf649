"""Benchmark of the trainer's data path and training speed on synthetic stores.

For two store shapes -- QVHighlights (T=75, k=4, P=50, C=768, 2 queries per video) and TACoS
(T=150, same tokens, 140 queries per video) -- built with
:func:`tests.helpers.synthetic.make_synthetic_store`:

1. samples/s (queries/s) the pooled streaming loader delivers from the store (cold: page cache
   dropped with ``posix_fadvise(DONTNEED)``; warm: right after), from RAM
   (:class:`train.data.sources.MemorySource`) and reference-style (one ``np.load`` of ``<vid>.npy`` and
   of ``<qid>.npy`` per query, then padded per-query stacking as the reference collate does; cold),
   all on the same videos;
2. the default loader on the same videos: uniform batches (:mod:`train.data.uniform`) with the RAM
   token cache (:mod:`train.data.cache`; its filling pass from a cold store, then warm), streamed from
   the store (cold) and assembled from tokens already in RAM;
3. the pooled loader over the whole store (cold);
4. training steps on ``--device`` (the preset's model, D=256; the presets' batches on a GPU, 8 queries
   on the CPU, 4 with ``--quick``) fed by the trainer's data path
   (:func:`train.engine.rundata.open_run_data`, uniform batches) with each token cache -- ``device``
   (GPU only), ``ram``, ``off`` (streamed, cold) -- and, as the baseline of the same run, on batches
   already on the device: samples/s, the step time split into data wait and compute, and the busy
   fraction of the GPU (CUDA events read once per interval, :class:`StepClock`).

Then the peak RSS of a 1-epoch ``train_run`` over stores of 1k and 10k small videos, each in a
fresh subprocess (``VmHWM``: the peak RSS of the child image, i.e. its ``ru_maxrss`` without the
parent's pages that Linux would carry over the fork).

Every rate is the best of 3 passes (store and RAM passes interleaved): the machine is shared.
Prints a markdown report (pasted into ``docs/training.md``).

    python scripts/bench_train.py                 # full: 200 videos per shape (~14 GB of disk)
    python scripts/bench_train.py --quick         # smoke run (small stores)
    python scripts/bench_train.py --device cuda --training-only   # the GPU table only
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import drop_cache, machine

from shards.store import open_store
from tests.helpers.synthetic import SyntheticSpec, make_synthetic_store, synthetic_run_config
from train.config import RunConfig
from train.data.batching import ModelInputs
from train.data.cache import CachePlan, TokenCache
from train.data.loader import LoaderConfig, StreamingLoader
from train.data.sources import MemorySource, TokenSource
from train.data.uniform import UniformLoader
from train.engine.rundata import RunData, epoch_inputs, open_run_data
from train.engine.step import TrainState, build_state, train_step
from train.engine.trainer import train_run

QVH = SyntheticSpec(
    n_videos=200, clips=75, layers=4, tokens=50, width=768, text_width=512, query_len=12,
    queries_per_video=2, min_len=2, max_len=20, disjoint=False, dataset="qvhighlights", backbone="ViT-B-32",
)
TACOS = dataclasses.replace(QVH, clips=150, query_len=10, queries_per_video=140, dataset="tacos")
RSS = SyntheticSpec(n_videos=1000, clips=16, layers=2, tokens=4, width=32, text_width=32, query_len=6,
                    queries_per_video=2, max_len=4, backbone="synthetic-rss")
RSS_OVERRIDES = ["model.dims=32", "model.heads=4", "batch_size=128", "train.pool_size=16",
                 "train.num_workers=0", "epochs=1", "warmup=0"]


# ------------------------------------------------------------------------------------------ helpers


def rate(batches: Iterable, limit_s: float) -> tuple[float, int]:
    """(queries per second, queries) over ``batches`` (objects with ``len``), stopping after ``limit_s``."""
    start, n = time.perf_counter(), 0
    for batch in batches:
        n += len(batch)
        if time.perf_counter() - start > limit_s:
            break
    return n / (time.perf_counter() - start), n


# ------------------------------------------------------------------------- reference-style baseline


def write_npy(store_path: Path, vids: list[str], root: Path) -> None:
    """One ``<vid>.npy`` per video and ``<qid>.npy`` per query, as the reference caches them."""
    store = open_store(store_path)
    (root / "vid").mkdir(parents=True)
    (root / "txt").mkdir()
    for vid in vids:
        np.save(root / "vid" / f"{vid}.npy", store.read_video(vid))
    for q in store.annotations():
        if q.vid in vids:
            np.save(root / "txt" / f"{q.qid}.npy", store.read_query(q.qid))


def _pad_stack(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(arrays), max(a.shape[0] for a in arrays), *arrays[0].shape[1:]), arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return out


class _NpyBatch:
    def __init__(self, video: torch.Tensor, query: torch.Tensor) -> None:
        self.video, self.query = video, query

    def __len__(self) -> int:
        return self.video.size(0)


def npy_batches(root: Path, queries: list, batch_size: int, seed: int = 0) -> Iterator[_NpyBatch]:
    """Reference-style batches: every query loads its video file and its query file, then padded stacking."""
    order = np.random.default_rng(seed).permutation(len(queries))
    for start in range(0, len(order), batch_size):
        picked = [queries[i] for i in order[start : start + batch_size]]
        videos = [np.load(root / "vid" / f"{q.vid}.npy") for q in picked]
        texts = [np.load(root / "txt" / f"{q.qid}.npy") for q in picked]
        yield _NpyBatch(torch.from_numpy(_pad_stack(videos)), torch.from_numpy(_pad_stack(texts)))


# ------------------------------------------------------------------------------------------ benches


def epochs(loader: StreamingLoader | UniformLoader, count: int) -> Iterator:
    """``count`` epochs of ``loader`` back to back (longer passes: steadier rates on a shared machine)."""
    for epoch in range(count):
        loader.set_epoch(epoch)
        yield from loader


def best_rate(make: Callable[[], Iterator], rounds: int, limit_s: float, cold: Path | None = None) -> float:
    """Best queries/s of ``rounds`` passes (page cache of ``cold`` dropped before each pass when given)."""
    best = 0.0
    for _ in range(rounds):
        if cold is not None:
            drop_cache(cold)
        best = max(best, rate(make(), limit_s)[0])
    return best


def bench_loader(spec: SyntheticSpec, root: Path, subset: int, batch: int, pools: list[int],
                 limit_s: float, rounds: int) -> dict:
    """Loader samples/s on ``subset`` videos: store (cold and warm page cache), RAM, reference-style
    .npy (cold); then over the whole store (cold). Best of ``rounds`` passes each."""
    store_path = root / f"{spec.dataset}.zarr"
    start = time.perf_counter()
    make_synthetic_store(store_path, spec)
    built = time.perf_counter() - start
    store = open_store(store_path)
    vids = store.video_ids()[:subset]
    keep = set(vids)
    queries = [q for q in store.annotations() if q.vid in keep]
    npy_root = root / f"{spec.dataset}_npy"
    write_npy(store_path, vids, npy_root)
    ram = MemorySource(
        store.manifest,
        {v: store.read_video(v) for v in vids},
        {v: store.video_fps(v) for v in vids},
        {q.qid: store.read_query(q.qid) for q in queries},
        queries,
    )
    repeat = max(1, 200 // len(queries))  # passes of >= 200 queries
    result: dict[str, Any] = {
        "videos": spec.n_videos, "queries": spec.n_videos * spec.queries_per_video, "subset": subset,
        "subset_queries": len(queries), "build_s": built, "gb": _size(store_path) / 1e9, "pools": {},
    }
    for pool in pools:
        cfg = LoaderConfig(batch_size=batch, videos_per_batch=pool, seed=0)

        def from_store(cfg: LoaderConfig = cfg) -> Iterator:
            return epochs(StreamingLoader(store_path, cfg, query_filter=lambda q: q.vid in keep), repeat)

        def from_ram(cfg: LoaderConfig = cfg) -> Iterator:
            return epochs(StreamingLoader(ram, cfg), repeat)

        row = {"ram": 0.0, "warm": 0.0}
        for _ in range(rounds):  # interleaved, so both see the same load of the shared machine
            row["ram"] = max(row["ram"], best_rate(from_ram, 1, limit_s))
            row["warm"] = max(row["warm"], best_rate(from_store, 1, limit_s))
        row["cold"] = best_rate(from_store, rounds, limit_s, cold=store_path)
        result["pools"][pool] = row
    result["npy"] = best_rate(lambda: npy_batches(npy_root, queries, batch), rounds, limit_s, cold=npy_root)
    result["uniform"] = bench_uniform(store_path, store, ram, keep, batch, repeat, limit_s, rounds)
    drop_cache(store_path)
    full_cfg = LoaderConfig(batch_size=batch, videos_per_batch=pools[0], seed=1)
    result["full_store"], result["full_queries"] = rate(StreamingLoader(store_path, full_cfg), limit_s * 4)
    shutil.rmtree(npy_root)
    return result


def _uniform(source: TokenSource, store_path: Path, mode: str, keep: set, batch: int) -> UniformLoader:
    cache = TokenCache(source, CachePlan(mode, torch.device("cpu"), 2**40, 0))
    return UniformLoader(cache, store_path, batch, seed=0, splits=(), query_filter=lambda q: q.vid in keep)


def bench_uniform(store_path: Path, store: TokenSource, ram: MemorySource, keep: set, batch: int,
                  repeat: int, limit_s: float, rounds: int) -> dict:
    """The reference's uniform batches (the default) on the same videos: with the RAM token cache
    (filled from a cold store by the first pass, timed once filled), streamed from the store (cold),
    and assembled from tokens already in RAM (the cache's ceiling)."""
    drop_cache(store_path)
    cached = _uniform(store, store_path, "ram", keep, batch)
    filling = rate(epochs(cached, 1), limit_s * 4)[0]
    in_ram = _uniform(ram, store_path, "off", keep, batch)
    row = {"cache_fill": filling, "cached": 0.0, "ram": 0.0}
    for _ in range(rounds):  # interleaved, so both see the same load of the shared machine
        row["cached"] = max(row["cached"], best_rate(lambda: epochs(cached, repeat), 1, limit_s))
        row["ram"] = max(row["ram"], best_rate(lambda: epochs(in_ram, repeat), 1, limit_s))
    streamed = _uniform(store, store_path, "off", keep, batch)
    row["streamed"] = best_rate(lambda: epochs(streamed, repeat), rounds, limit_s, cold=store_path)
    return row


class StepClock:
    """Splits the wall time of consecutive training steps into data wait and compute.

    Data wait: host time spent getting the next model inputs (loader + copies to the device). On
    CUDA each step is bracketed by CUDA events, read once at the end of the interval (one
    ``torch.cuda.synchronize``, none per step): compute is the sum of the GPU spans from a step's
    first to its last work, the gaps are the GPU idle time between consecutive steps, and GPU busy
    is compute / wall. On the CPU compute is the host time inside the steps.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.data_s = self.host_compute_s = 0.0
        self.steps = self.queries = 0
        self._sync()
        self.start = time.perf_counter()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def fetch(self, inputs: Iterator[tuple[ModelInputs, int]]) -> tuple[ModelInputs, int]:
        """The next ``(inputs, queries)``, timed as data wait."""
        start = time.perf_counter()
        item = next(inputs)
        self.data_s += time.perf_counter() - start
        return item

    def step(self, state: TrainState, inputs: ModelInputs, queries: int) -> None:
        """One optimizer step, timed as compute."""
        start = time.perf_counter()
        if self.cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream = torch.cuda.current_stream(self.device)
            begin.record(stream)
            train_step(state, inputs)
            end.record(stream)
            self.events.append((begin, end))
        else:
            train_step(state, inputs)
        self.host_compute_s += time.perf_counter() - start
        self.steps += 1
        self.queries += queries

    def result(self) -> dict:
        """Steps, queries/s, per-step wall, data wait, compute and gap (ms), GPU busy fraction."""
        self._sync()
        wall = time.perf_counter() - self.start
        if self.cuda:
            compute = sum(b.elapsed_time(e) for b, e in self.events) / 1e3
            pairs = zip(self.events, self.events[1:], strict=False)
            gaps = sum(end.elapsed_time(begin) for (_, end), (begin, _) in pairs) / 1e3
        else:
            compute, gaps = self.host_compute_s, self.data_s
        per_step = 1e3 / max(self.steps, 1)
        return {"steps": self.steps, "samples_per_s": self.queries / wall, "step_ms": wall * per_step,
                "data_ms": self.data_s * per_step, "data_share": self.data_s / wall,
                "compute_ms": compute * per_step, "gap_ms": gaps * per_step, "busy": compute / wall}


def forever(data: RunData, cfg: RunConfig, first_epoch: int = 0) -> Iterator[tuple[ModelInputs, int]]:
    """Model inputs of the trainer's epochs (:func:`train.engine.rundata.epoch_inputs`) back to back."""
    for epoch in itertools.count(first_epoch):
        yield from epoch_inputs(data.loader, cfg, data.spec, data.device, epoch)


def fill_cache(data: RunData) -> None:
    """Read every training video and query into the run's token cache (its first epoch would)."""
    loader = data.loader
    assert isinstance(loader, UniformLoader)
    for q in loader.queries:
        loader.cache.video_tensor(q.vid)
        loader.cache.read_query(q.qid)


def timed_steps(state: TrainState, inputs: Iterator[tuple[ModelInputs, int]], steps: int) -> dict:
    """One warm-up step, then ``steps`` timed ones (:class:`StepClock`)."""
    state.model.train()
    batch, size = next(inputs)
    train_step(state, batch)
    clock = StepClock(state.device)
    for _ in range(steps):
        batch, size = clock.fetch(inputs)
        clock.step(state, batch, size)
    return clock.result()


def bench_steps(spec: SyntheticSpec, root: Path, preset: str, batch: int, steps: int, device: str) -> dict:
    """Training steps with the preset's model (D=256) and the trainer's data path (uniform batches,
    :func:`train.engine.rundata.open_run_data`) per token cache: ``device`` (CUDA only), ``ram``,
    ``off`` (streamed from the store, page cache dropped first); and the baseline: the same steps on
    two batches already on the device, cycled (no data path at all)."""
    store_path = root / f"{spec.dataset}.zarr"
    torch_device = torch.device(device)
    workers = [] if torch_device.type == "cuda" else ["train.num_workers=0"]  # 2 shared cores: none
    modes = ["device", "ram", "off"] if torch_device.type == "cuda" else ["ram", "off"]
    rows: dict[str, dict] = {}
    state: TrainState | None = None
    for mode in modes:
        overrides = [f"batch_size={batch}", f"train.cache={mode}", *workers]
        cfg, data = open_run_data(synthetic_run_config(spec, preset, overrides), store_path, device)
        state = state or build_state(cfg, torch_device)
        if mode == "off":
            drop_cache(store_path)
        else:
            fill_cache(data)
        inputs = forever(data, cfg)
        if mode == modes[0]:  # the baseline: inputs already on the device
            cached = [next(inputs), next(inputs)]
            rows["baseline"] = timed_steps(state, itertools.cycle(cached), steps)
            del cached
        rows[mode] = timed_steps(state, inputs, steps)
        del data, inputs
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
    return {"batch": batch, "modes": rows}


def rss_child(store_path: str, out_dir: str) -> None:
    """Subprocess body: one epoch of ``train_run`` (tiny model); print queries and peak RSS in MB."""
    torch.set_num_threads(1)
    cfg = synthetic_run_config(RSS, "tacos", RSS_OVERRIDES)
    result = train_run(cfg, store_path, out_dir, progress=False)
    status = Path("/proc/self/status").read_text().splitlines()
    hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"queries": result.history[0]["samples"], "rss_mb": hwm_kb / 1024}))


def bench_rss(root: Path, sizes: tuple[int, int]) -> list[dict]:
    """Peak RSS of a 1-epoch training run over stores of ``sizes`` small videos, each in a fresh process."""
    out = []
    for n in sizes:
        path = root / f"rss_{n}.zarr"
        make_synthetic_store(path, dataclasses.replace(RSS, n_videos=n))
        done = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(path), str(root / f"rss_run_{n}")],
            check=True, capture_output=True, text=True,
        )
        child = json.loads(done.stdout.strip().splitlines()[-1])
        out.append({"videos": n, "store_mb": _size(path) / 1e6, **child})
        shutil.rmtree(path)
    return out


def _size(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)


# ------------------------------------------------------------------------------------------- report


MODE_NAMES = {"baseline": "inputs already on the device (baseline)", "device": "device cache",
              "ram": "RAM cache", "off": "streamed (cold)"}


def training_table(training: dict[str, dict]) -> list[str]:
    """The step-time split per shape and token cache, with samples/s relative to the baseline."""
    lines = [
        "",
        "Training steps (preset model, D=256; the trainer's uniform loader; per step: wall = data wait "
        "(host) + the rest; busy = compute / wall, on CUDA the GPU span of the steps from CUDA events, "
        "target ≥ 0.8 with the device cache; data wait target ≤ 10 % of the step):",
        "",
        "| shape | batch | loader | timed steps | samples/s | vs baseline | step ms | data wait ms (share) "
        "| compute ms | gaps between steps ms | busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in training.items():
        base = t["modes"]["baseline"]["samples_per_s"]
        for mode, r in t["modes"].items():
            lines.append(
                f"| {name} | {t['batch']} | {MODE_NAMES[mode]} | {r['steps']} | {r['samples_per_s']:.1f} | "
                f"{r['samples_per_s'] / base:.2f} | {r['step_ms']:.1f} | {r['data_ms']:.1f} "
                f"({r['data_share']:.0%}) | {r['compute_ms']:.1f} | {r['gap_ms']:.1f} | {r['busy']:.0%} |"
            )
    return lines


def report(loader: dict[str, dict], training: dict[str, dict], rss: list[dict], seconds: float) -> str:
    lines = [f"Machine: {machine()}. Total bench time {seconds / 60:.1f} min.", ""]
    if not loader:
        return "\n".join(lines[:1] + training_table(training))
    lines += [
        "| shape | videos used (store GB) | pool | store cold q/s | store warm q/s | RAM q/s | warm / RAM "
        "| reference .npy cold q/s | store cold / .npy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in loader.items():
        for pool, p in r["pools"].items():
            lines.append(
                f"| {name} | {r['subset']} of {r['videos']} ({r['gb']:.1f}) | {pool} | {p['cold']:,.0f} | "
                f"{p['warm']:,.0f} | {p['ram']:,.0f} | {p['warm'] / p['ram']:.2f} | {r['npy']:,.1f} "
                f"| {p['cold'] / r['npy']:.1f} |"
            )
    lines += [
        "",
        "Uniform batches (the reference's, the default), same videos, batch 32:",
        "",
        "| shape | RAM cache q/s | from RAM q/s | cache / RAM (target ≥ 0.9) | streamed cold q/s "
        "| filling the cache (1st pass, cold) q/s | reference .npy cold q/s "
        "| cache / .npy (target ≥ 3 on TACoS) | pooled (pool 8) cold q/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in loader.items():
        u = r["uniform"]
        lines.append(
            f"| {name} | {u['cached']:,.0f} | {u['ram']:,.0f} | {u['cached'] / u['ram']:.2f} | "
            f"{u['streamed']:,.1f} | {u['cache_fill']:,.1f} | {r['npy']:,.1f} | {u['cached'] / r['npy']:.1f} "
            f"| {r['pools'][8]['cold']:,.0f} |"
        )
    lines += ["", "| shape | whole-store loader q/s (cold) | queries | store build s |", "|---|---|---|---|"]
    for name, r in loader.items():
        lines.append(f"| {name} | {r['full_store']:,.0f} | {r['full_queries']:,} | {r['build_s']:.0f} |")
    lines += training_table(training)
    lines += ["", "| videos | queries | store MB | peak RSS MB (1-epoch train_run) |", "|---|---|---|---|"]
    for r in rss:
        lines.append(f"| {r['videos']:,} | {r['queries']:,} | {r['store_mb']:.0f} | {r['rss_mb']:.0f} |")
    lines.append(f"\nRSS ratio {rss[-1]['videos']:,} / {rss[0]['videos']:,} videos: "
                 f"{rss[-1]['rss_mb'] / rss[0]['rss_mb']:.2f}; peak RSS minus the cached store "
                 f"(target ≤ 1,536 MB): {max(r['rss_mb'] - r['store_mb'] for r in rss):,.0f} MB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small stores (smoke run)")
    parser.add_argument("--device", default="cpu",
                        help="where the training steps run: cpu (default) or cuda[:N]")
    parser.add_argument("--training-only", action="store_true",
                        help="only build the stores and time the training steps (e.g. a GPU run)")
    parser.add_argument("--videos", type=int,
                        help="videos per store shape (default: 200; 12 / 6 with --quick)")
    parser.add_argument("--root", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--rss-child", nargs=2, metavar=("STORE", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench_train_", dir=args.root))
    try:
        quick = args.quick
        qvh = dataclasses.replace(QVH, n_videos=args.videos or (12 if quick else 200))
        tacos = dataclasses.replace(TACOS, n_videos=args.videos or (6 if quick else 200))
        limit, rounds = (10.0, 1) if quick else (30.0, 3)
        loader: dict[str, dict] = {}
        if args.training_only:
            for spec in (qvh, tacos):
                make_synthetic_store(root / f"{spec.dataset}.zarr", spec)
        else:
            loader = {
                "QVHighlights (T=75, 2 q/video)": bench_loader(qvh, root, min(qvh.n_videos // 2, 40), 32,
                                                               [8, 32], limit, rounds),
                "TACoS (T=150, 140 q/video)": bench_loader(tacos, root, min(tacos.n_videos // 2, 32), 32,
                                                           [8, 32], limit, rounds),
            }
        gpu = torch.device(args.device).type == "cuda"
        if gpu:
            torch.cuda.set_device(torch.device(args.device))
        steps = (5 if quick else 30) if gpu else (1 if quick else 6)
        small = 4 if quick else 8  # queries per batch on the CPU; the presets' batches on a GPU
        training = {
            "QVHighlights": bench_steps(qvh, root, "qvhighlights", 128 if gpu else small, steps, args.device),
            "TACoS": bench_steps(tacos, root, "tacos", 32 if gpu else small, steps, args.device),
        }
        rss = [] if args.training_only else bench_rss(root, (100, 1000) if quick else (1000, 10000))
        print(report(loader, training, rss, time.perf_counter() - start))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
