"""Benchmark of sweeps: K trials on one shared data pass vs. K separate runs, and LocalCluster scaling.

One synthetic store with ViT-B-32 token shapes (k=4, P=50, C=768, Cq=512; :mod:`tests.helpers.synthetic`),
K trials that differ only in the learning rate (so they may share a pass). Measured in this process:

* ``separate``: the K trials one after the other (``run_sweep(workers=0, shared_pass='off')``);
* ``shared``:   the K trials on one shared pass (``run_sweep(workers=0, shared_pass='on')``);

each with the preset's model (D=256, dropout on the input tokens) and a light one (D=16, no dropout:
the model's share shrinks towards what it is on a GPU), each with a warm page cache and cold (the
store's pages dropped with ``posix_fadvise(DONTNEED)`` before the sweep and after every trial, as for
a store larger than RAM). Token bytes read from the store are counted by wrapping
``shards.store.RawArray.read_rows`` and ``RawArray.map`` (metadata reads not counted). The shared
pass's metrics must equal the separate runs' (checked). Next to it, the data path alone: one epoch of
the training loader + ``model_inputs`` (what a shared pass does once instead of K times) and one read
of the validation split. In-process runs use one torch thread. Then LocalCluster scaling with the real
trainer (shared pass off): 1 worker x 1 thread, 1 worker x 2 threads, 2 workers x 1 thread, and
2 workers with ``--shared-pass auto`` (two passes of K/2 trials). Prints a markdown report (for
``docs/sweeps.md``)::

    python scripts/bench_sweep.py                     # K=4, modest size (a few minutes on 2 cores)
    python scripts/bench_sweep.py --quick             # smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from benchlib import drop_cache, machine

import shards.store
from tests.helpers.synthetic import SyntheticSpec, make_synthetic_store
from train.engine.rundata import epoch_inputs, open_run_data
from train.sweep.config import trial_config
from train.sweep.runner import plan_sweep, run_sweep
from train.sweep.spec import build_spec


class ReadCounter:
    """Counts the token bytes this process reads from stores: ``RawArray.read_rows`` (copies into a
    buffer) and ``RawArray.map`` (the loader's page-cache mapping of a whole video)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._read_rows = shards.store.RawArray.read_rows
        self._map = getattr(shards.store.RawArray, "map", None)

    def __enter__(self) -> ReadCounter:
        read_rows, map_array, counter = self._read_rows, self._map, self

        def counting_read(array, start, stop, out):
            counter.bytes += (stop - start) * array.row_nbytes
            return read_rows(array, start, stop, out)

        def counting_map(array):
            mapped = map_array(array)
            counter.bytes += 0 if mapped is None else mapped.nbytes
            return mapped

        shards.store.RawArray.read_rows = counting_read
        if map_array is not None:
            shards.store.RawArray.map = counting_map
        return self

    def __exit__(self, *exc: object) -> None:
        shards.store.RawArray.read_rows = self._read_rows
        if self._map is not None:
            shards.store.RawArray.map = self._map


def data_path_seconds(store: Path, fixed: list[str], cold: bool) -> tuple[float, float]:
    """Seconds of one training epoch of loader + ``model_inputs`` and of one validation read, no model."""
    cfg, data = open_run_data(trial_config("charades", store, [*fixed, "train.num_workers=0"]), store, "cpu")
    if cold:
        drop_cache(store)
    start = time.perf_counter()
    for _ in epoch_inputs(data.loader, cfg, data.spec, data.device, 0):
        pass
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in data.val_loader:
        pass
    return train_s, time.perf_counter() - start


def sweep_once(store: Path, out: Path, fixed: list[str], lrs: list[str], *, workers: int, shared: str,
               cold: bool, threads: int | None = None) -> tuple[float, int, dict[str, dict[str, float]]]:
    """Run the K-trial sweep into a fresh ``out``; returns (wall s, token bytes read here, metrics by lr).

    ``cold``: the store's pages are dropped before the sweep and after every finished trial, so each
    separate run reads from disk (a store larger than RAM)."""
    shutil.rmtree(out, ignore_errors=True)
    spec = build_spec(preset="charades", store=str(store), grid=["lr=" + ",".join(lrs)], fixed=fixed)
    plan = plan_sweep(spec, out, device="cpu")
    if cold:
        drop_cache(store)
    on_record = (lambda record: drop_cache(store)) if cold else None
    with ReadCounter() as counter:
        start = time.perf_counter()
        result = run_sweep(plan, workers=workers, shared_pass=shared, threads=threads, on_record=on_record)
        seconds = time.perf_counter() - start
    bad = [r for r in result.records if r.status != "ok"]
    if bad:
        raise RuntimeError(f"trial {bad[0].name} did not finish: {bad[0].error}")
    return seconds, counter.bytes, {r.params["lr"]: r.metrics for r in result.records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="K")
    parser.add_argument("--videos", type=int, default=10, help="videos in the store (1/5 held out)")
    parser.add_argument("--clips", type=int, default=24, help="T, clips per video")
    parser.add_argument("--queries", type=int, default=4, help="queries per video")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--skip-cluster", action="store_true", help="no LocalCluster runs")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.videos, args.clips, args.queries, args.trials = 5, 12, 2, 2

    torch.set_num_threads(1)
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])   # one-time lazy imports, outside the timings
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store.zarr"
    shutil.rmtree(store, ignore_errors=True)
    heldout = max(1, args.videos // 5)
    make_synthetic_store(store, SyntheticSpec(
        n_videos=args.videos, n_heldout=heldout, clips=args.clips, layers=4, tokens=50, width=768,
        text_width=512, query_len=12, queries_per_video=args.queries, concepts=8, min_len=2, max_len=5,
        fps=0.5, dataset="charades", backbone="ViT-B-32", seed=0,
    ))
    store_mb = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 1e6
    lrs = [f"{(i + 1) * 1e-4:g}" for i in range(args.trials)]
    base = [f"epochs={args.epochs}", f"batch_size={args.batch_size}", "warmup=2"]
    print(f"# bench_sweep: K={args.trials} trials, {args.videos} videos ({heldout} held out) "
          f"x T={args.clips} x (k=4, P=50, C=768) fp16 = {store_mb:.1f} MB store, "
          f"{args.queries} queries/video, batch {args.batch_size}, {args.epochs} epoch(s)")
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.1f} (the box is shared)\n")
    print("| model | cache | run | wall s | token MB read | bytes vs separate | speed-up vs separate |")
    print("|---|---|---|---:|---:|---:|---:|")
    models = {"D=256": ["model.dims=256", "model.heads=8"],
              "D=16, dropout 0": ["model.dims=16", "model.heads=8", "model.dropout=0"]}
    for tag, (name, model) in enumerate(models.items()):
        fixed = [*base, *model]
        for cold in (False, True):
            runs = {}
            for shared in ("off", "on"):
                out = work / f"model{tag}_{'cold' if cold else 'warm'}_{shared}"
                runs[shared] = sweep_once(store, out, fixed, lrs, workers=0, shared=shared, cold=cold)
            if runs["on"][2] != runs["off"][2]:
                raise RuntimeError("shared-pass metrics differ from the separate runs")
            (t_sep, b_sep, _), (t_sh, b_sh, _) = runs["off"], runs["on"]
            cache = "cold" if cold else "warm"
            print(f"| {name} | {cache} | {args.trials} separate | {t_sep:.1f} | {b_sep / 1e6:.1f} "
                  "| 1 | 1 |")
            print(f"| {name} | {cache} | shared pass x{args.trials} | {t_sh:.1f} | {b_sh / 1e6:.1f} "
                  f"| {b_sh / b_sep:.3f} | {t_sep / t_sh:.2f} |")
    print("\n(cold: the store's pages are dropped before the sweep and after each trial. "
          "Metrics of the shared pass = separate runs: checked.)\n")
    print("| data path alone (no model) | warm s | cold s |")
    print("|---|---:|---:|")
    warm, cold = data_path_seconds(store, base, False), data_path_seconds(store, base, True)
    print(f"| 1 epoch: train loader + model_inputs | {warm[0]:.2f} | {cold[0]:.2f} |")
    print(f"| 1 validation read | {warm[1]:.2f} | {cold[1]:.2f} |")
    if args.skip_cluster:
        return
    print("\n| LocalCluster, D=256, warm, shared pass off unless said | wall s incl. cluster start "
          "| speed-up vs 1 worker x 1 thread |")
    print("|---|---:|---:|")
    fixed = [*base, *models["D=256"]]
    timings = {}
    for label, workers, threads, shared in (
        ("1 worker x 1 thread", 1, 1, "off"),
        ("1 worker x 2 threads", 1, 2, "off"),
        ("2 workers x 1 thread", 2, 1, "off"),
        ("2 workers x 1 thread, shared auto (2 passes of K/2)", 2, 1, "auto"),
    ):
        out = work / f"cluster_{workers}_{threads}_{shared}"
        timings[label] = sweep_once(store, out, fixed, lrs, workers=workers, shared=shared, cold=False,
                                    threads=threads)[0]
    first = timings["1 worker x 1 thread"]
    for label, seconds in timings.items():
        print(f"| {label} | {seconds:.1f} | {first / seconds:.2f} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
