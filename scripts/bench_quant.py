"""Benchmark of the store's size knobs: ``--dtype int8`` and ``--token-pool 2`` against float16.

Two parts, each well under a minute on a 2-core box:

* ``store``: synthetic stores of SigLIP B/16 geometry (T=75 clips = 150 s at 0.5 fps, k=4, P=197,
  C=768; Cq=512), float16 and int8 (``--tokens 50``: the same pooled 2x2, which is also ViT-B/32's):
  token bytes on disk, extraction-side write rate (quantization included), cold whole-video reads
  through ``read_video`` (float16 delivered, page cache dropped before each round), cold and warm
  streaming-loader samples/s (batch 32, pool 8, ``map_stored`` + dequantization into the batch),
  and the uniform loader from a RAM token cache (the cache keeps int8; dequantized per batch).
* ``drift``: the R² model with the parity fixture's weights (tests/data/r2_parity) on the fixture's
  tokens as float32, as a float16 store holds them and as an int8 store holds them
  (:func:`shards.quant.roundtrip` of video and query tokens): max |Δ| of the boundaries of every
  pyramid point (seconds, and relative to the video's duration), of the scores, and of the saliency
  (relative to its range), plus whether the top-1 window changes. The fixture's video tokens are
  uniform int8 codes x 0.5; a stress variant gives 2 of the 768 channels 30x the magnitude (the
  massive activations of real CLIP residual streams, which per-token scales must cover).

    python scripts/bench_quant.py store --tokens 197     # then --tokens 50: the same pooled 2x2
    python scripts/bench_quant.py drift
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_store import add_queries, bench_manifest, loader_rate, timed_reads
from benchlib import drop_cache, machine

from shards.quant import roundtrip
from shards.store import create_store, open_store
from train.config import get_preset
from train.data.cache import CachePlan, TokenCache
from train.data.loader import LoaderConfig
from train.data.uniform import UniformLoader
from train.model import R2Tuning
from train.model.decode import decode_saliency

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "data" / "r2_parity"
T, K, C, CQ = 75, 4, 768, 512
DTYPES = ("float16", "int8")
MB = 1e6


# ------------------------------------------------------------------------------------------- store


def write_store(path: Path, tokens: int, dtype: str, vids: list[str], queries: int) -> float:
    """A store of synthetic float32 tokens (the extraction's output) with ``queries`` queries per video;
    returns the write MB/s of float16 tokens (the float32 -> float16 conversion included)."""
    store = create_store(path, bench_manifest((T, K, tokens, C), CQ, dtype=dtype), fsync=False)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((T, K, tokens, C), dtype=np.float32)
    start = time.perf_counter()
    for i, vid in enumerate(vids):
        store.write_video(vid, base * (1 + i / 100), 0.5)
    os.sync()
    elapsed = time.perf_counter() - start
    add_queries(path, vids, queries, (12, K, CQ))
    return len(vids) * base.size * 2 / elapsed / MB


def token_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("c.*"))


def uniform_rate(path: Path) -> float:
    """Samples/s of the uniform loader from a filled RAM token cache (int8 kept, dequantized per batch)."""
    store = open_store(path)
    cache = TokenCache(store, CachePlan("ram", torch.device("cpu"), 2**40, 0))
    loader = UniformLoader(cache, path, batch_size=32, seed=0)
    sum(len(b) for b in loader)  # fills the cache
    start = time.perf_counter()
    n = sum(len(b) for b in loader)
    return n / (time.perf_counter() - start)


def bench_store(root: Path, tokens: int, videos: int, queries: int, rounds: int) -> None:
    vids = [f"v{i:03d}" for i in range(videos)]
    order = list(np.random.default_rng(1).permutation(vids))
    rows: dict[str, dict[str, float]] = {}
    for dtype in DTYPES:
        path = root / f"{dtype}.zarr"
        rows[dtype] = {"write": write_store(path, tokens, dtype, vids, queries), "bytes": token_bytes(path)}
    cfg = LoaderConfig(batch_size=32, videos_per_batch=8, seed=0)
    for _ in range(rounds):
        for dtype in DTYPES:
            path, row = root / f"{dtype}.zarr", rows[dtype]
            drop_cache(path)
            row["cold"] = max(row.get("cold", 0), timed_reads(open_store(path).read_video, order)[0])
            drop_cache(path)
            row["loader cold"] = max(row.get("loader cold", 0), loader_rate(path, cfg))
            row["loader warm"] = max(row.get("loader warm", 0), loader_rate(path, cfg))
            row["uniform ram"] = max(row.get("uniform ram", 0), uniform_rate(path))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Machine: {machine()}. Load average at the end (1, 5, 15 min): {load}; shared box, best of "
          f"{rounds} interleaved rounds.")
    print(f"{videos} videos of (T={T}, k={K}, P={tokens}, C={C}), {queries} queries each (L=12, Cq={CQ}).\n")
    print("| P, dtype | token bytes | vs float16 | write MB/s (f16 in) | cold read_video MB/s (f16 out) "
          "| clips/s | loader cold samples/s | loader warm | uniform, RAM cache |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype, row in rows.items():
        clip_mb, ratio = K * tokens * C * 2 / MB, row["bytes"] / rows["float16"]["bytes"]
        print(f"| {tokens}, {dtype} | {row['bytes'] / MB:,.0f} MB | {ratio:.3f} "
              f"| {row['write']:,.0f} | {row['cold']:,.0f} | {row['cold'] / clip_mb:,.0f} "
              f"| {row['loader cold']:,.1f} | {row['loader warm']:,.1f} | {row['uniform ram']:,.1f} |")


# ------------------------------------------------------------------------------------------- drift


def fixture_model(preset: str, weights: str) -> R2Tuning:
    cfg = get_preset(preset)
    net = R2Tuning(cfg.model, cfg.loss)
    net.load_state_dict(torch.load(FIXTURE / weights, weights_only=True), strict=True)
    return net.eval()


@torch.no_grad()
def outputs(net: R2Tuning, video: np.ndarray, query: np.ndarray, fps: float) -> dict[str, np.ndarray]:
    """Per-point windows ``[start_s, end_s]`` and scores (unsorted), and the saliency of one sample."""
    v, q = torch.from_numpy(video.astype(np.float32)), torch.from_numpy(query.astype(np.float32))
    masks = torch.ones(1, len(v), dtype=torch.bool), torch.ones(1, len(q), dtype=torch.bool)
    out = net(v[None], masks[0], q[None], masks[1])
    emb = out.video_emb[0], out.query_emb[0]
    saliency = decode_saliency(out.class_logits[0], out.level_sizes, len(v), *emb)
    result = {"saliency": saliency.numpy()}
    if out.coord is not None:
        valid = out.pymid_mask[0]
        t, stride = out.points[valid, 0], out.points[valid, 3]
        coord = out.coord[0][valid]
        start, end = (t - coord[:, 0] * stride) / fps, (t + coord[:, 1] * stride) / fps
        result["windows"] = torch.stack((start, end), -1).numpy()
        result["score"] = out.class_logits[0][valid].sigmoid().numpy()
    return result


def drift_line(label: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray], duration: float) -> str:
    sal = np.abs(got["saliency"] - ref["saliency"]).max() / np.ptp(ref["saliency"])
    text = f"| {label} | {sal:.2e} |"
    if "windows" in ref:
        top = np.argsort(-ref["score"])[:50]
        bound = np.abs(got["windows"][top] - ref["windows"][top]).max()
        score = np.abs(got["score"] - ref["score"]).max()
        same = int(np.argmax(got["score"]) == np.argmax(ref["score"]))
        text += f" {bound:.2e} s ({bound / duration:.1e} of T/fps) | {score:.1e} | {('NO', 'yes')[same]} |"
    else:
        text += " – | – | – |"
    return text


def bench_drift() -> None:
    inputs = dict(np.load(FIXTURE / "inputs.npz"))
    fps = float(inputs["fps"])
    rng = np.random.default_rng(0)
    outliers = rng.choice(C, 2, replace=False)
    print(f"Machine: {machine()}.\n")
    print("| model, sample, tokens vs float32 tokens | saliency max abs diff / range "
          "| boundaries max abs diff (top-50 points) | scores max abs diff | same top-1 |")
    print("|---|---|---|---|---|")
    models = (("MR", "qvhighlights", "state_dict.pt"), ("HD", "tvsum_BK", "state_dict_hd.pt"))
    for kind, preset, weights in models:
        net = fixture_model(preset, weights)
        for sample in ("A", "B"):
            video = inputs[f"video_{sample}_codes"].astype(np.float32) * inputs["video_scale"]
            query = inputs[f"query_{sample}"]
            stressed = video.copy()
            stressed[..., outliers] *= 30
            for variant, v in (("fixture", video), ("2 outlier channels x30", stressed)):
                ref = outputs(net, v, query, fps)
                for dtype in ("float16", "int8"):
                    got = outputs(net, roundtrip(v, dtype), roundtrip(query, dtype), fps)
                    label = f"{kind} {sample} (T={len(v)}), {variant}, {dtype} store"
                    print(drift_line(label, ref, got, len(v) / fps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("store", "drift"))
    parser.add_argument("--tokens", type=int, default=197, help="P: 197 (B/16), 50 (B/16 pooled 2x2)")
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--queries", type=int, default=8, help="queries per video")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=Path("bench_out/quant"), help="scratch (deleted)")
    args = parser.parse_args()
    if args.part == "drift":
        bench_drift()
        return
    if args.out_dir.exists():
        sys.exit(f"{args.out_dir} exists; remove it or pick another --out-dir")
    args.out_dir.mkdir(parents=True)
    try:
        bench_store(args.out_dir, args.tokens, args.videos, args.queries, args.rounds)
    finally:
        shutil.rmtree(args.out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
