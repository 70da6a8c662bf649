"""Benchmark the extraction: decode-only, CLIP-only, end-to-end, and the reference's two-stage way.

All four run in one process on the same videos (the embedded sample unless ``--videos``):

* decode-only: :func:`extract.frames.sample_frames` (PyAV + libavfilter fps/scale/crop, or the
  backbone's own resize mode), with as many decoding threads (one video each) as the end-to-end run;
* CLIP-only: the image tower on frames already in (pinned, on a GPU) host memory, batches of
  ``--batch-size`` queued back to back, tokens left on the device as float16, one wait at the end
  (the model's ceiling);
* end-to-end: :func:`extract.pipeline.extract_videos` into a fresh store (decode threads, packed
  batches, writer thread);
* two-stage: the reference's way: the ffmpeg command line writes JPEG frames to disk, then they
  are loaded with PIL and encoded, one ``.npy`` per video (ffmpeg binary from ``imageio-ffmpeg``).

Reports the machine, sampled frames per second for each, the serial bound ``1 / (1/decode + 1/CLIP)``
(what a pipeline without overlap reaches when decode and CLIP share the same cores), ratios --
end-to-end / min(decode-only, CLIP-only) is the pipeline's efficiency, target ≥ 0.8 on a GPU -- and
store bytes per minute of video. Random weights unless ``--pretrained``; throughput does not depend on
the weights. Any backbone of :mod:`shards.backbones` (``--arch ViT-B-16-SigLIP``): frames are made as
its preprocessing says; the comparison with the ffmpeg command line is made for the reference's
(short side, bicubic, centre crop) only, and the two-stage run scales the reference's way whatever
the backbone (its time, not its frames, is compared). Usage::

    python scripts/bench_extract.py                       # CPU, embedded sample at 1 fps
    python scripts/bench_extract.py --quick               # smoke run: 1 trial at 0.25 fps
    python scripts/bench_extract.py --quick --arch EVA02-B-16
    python scripts/bench_extract.py --device cuda --videos DIR --fps 0.5 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from benchlib import machine
from PIL import Image

from extract.backbone import ClipBackbone, load_backbone
from extract.config import VIDEO_EXTENSIONS, decode_workers, decoder_threads, sample_paths
from extract.frames import crop_offset, preprocess, preprocess_spec, probe, sample_frames, scaled_size
from extract.pipeline import VideoTask, extract_videos
from shards.store import create_store


def _encode(backbone: ClipBackbone, frames: np.ndarray, batch_size: int) -> np.ndarray:
    """Image-tower tokens ``(T, k, P, C)`` float16 of ``(T, S, S, 3)`` uint8 frames."""
    out = [
        backbone.encode_frames(preprocess(frames[i : i + batch_size], backbone.device, backbone.preprocess))
        .half()
        .cpu()
        for i in range(0, len(frames), batch_size)
    ]
    return torch.cat(out).numpy()


def _tower_only(backbone: ClipBackbone, frames: torch.Tensor, batch_size: int) -> int:
    """Run the image tower on ``(T, S, S, 3)`` uint8 frames in host memory, batch after batch without
    waiting (float16 tokens left on the device), then wait once; returns ``T``."""
    for i in range(0, len(frames), batch_size):
        images = preprocess(frames[i : i + batch_size], backbone.device, backbone.preprocess)
        backbone.encode_frames(images).half()
    if backbone.device.type == "cuda":
        torch.cuda.synchronize(backbone.device)
    return len(frames)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ffmpeg), all threads."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(fn: Callable[[], int]) -> tuple[float, float]:
    """Run ``fn`` (returns a frame count); return (frames per wall second, frames per CPU second)."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    count = fn()
    return count / (time.perf_counter() - wall), count / (_cpu_seconds() - cpu)


def _ffmpeg_command(ffmpeg: str, path: Path, fps: float, size: int, *output: str) -> list[str]:
    """The reference's ffmpeg command line: sample ``path`` at ``fps``, scale the short side to ``size``,
    centre-crop ``size`` x ``size``, then the ``output`` arguments."""
    info = probe(path)
    w, h = scaled_size(info.width, info.height, size)
    x, y = crop_offset(w, h, size)
    graph = f"fps={fps},scale={w}:{h},crop={size}:{size}:{x}:{y}"
    return [ffmpeg, "-loglevel", "error", "-i", str(path), "-vf", graph, *output]


def _two_stage(
    ffmpeg: str, videos: list[Path], fps: float, backbone: ClipBackbone, batch_size: int, work: Path
) -> int:
    """The reference's pipeline: ffmpeg -> JPEG files on disk, then PIL load + CLIP -> one .npy per video."""
    size = backbone.frame_size
    frames_total = 0
    for n, path in enumerate(videos):
        folder = work / f"frames{n}"
        folder.mkdir()
        jpegs = str(folder / "%06d.jpg")
        subprocess.run(_ffmpeg_command(ffmpeg, path, fps, size, "-q:v", "2", jpegs), check=True)
    for n in range(len(videos)):
        files = sorted((work / f"frames{n}").glob("*.jpg"))
        frames = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        np.save(work / f"video{n}.npy", _encode(backbone, frames, batch_size))
        frames_total += len(frames)
    return frames_total


def _ffmpeg_matches(ffmpeg: str, path: Path, fps: float, backbone: ClipBackbone) -> bool | None:
    """Whether the ffmpeg command line's rgb24 frames equal ours byte for byte; ``None`` when the
    backbone's frames are not made the reference's way."""
    size = backbone.frame_size
    if backbone.preprocess != preprocess_spec(size):
        return None
    command = _ffmpeg_command(ffmpeg, path, fps, size, "-f", "rawvideo", "-pix_fmt", "rgb24", "-")
    raw = subprocess.run(command, check=True, capture_output=True).stdout
    ours = b"".join(f.tobytes() for f in sample_frames(path, fps, size))
    return raw == ours


def _same_text(same: object) -> str:
    """``True`` / ``False``, or why the frames were not compared (``None``)."""
    return "n/a (frames not made the reference's way)" if same is None else str(same)


class _Bench:
    """The four measurements on one list of videos; each returns sampled frames per (wall, CPU) second."""

    def __init__(
        self,
        backbone: ClipBackbone,
        videos: list[Path],
        fps: float,
        batch_size: int,
        workers: int,
        ffmpeg: str,
        work: Path,
    ) -> None:
        self.backbone, self.videos, self.fps = backbone, videos, fps
        self.batch_size, self.workers, self.ffmpeg, self.work = batch_size, workers, ffmpeg, work
        self.frames: list[np.ndarray] = []
        self.runs = 0
        self.store = create_store(work / "bench.zarr", backbone.manifest("bench", fps), fsync=False)

    def decode(self) -> tuple[float, float]:
        count = max(1, min(self.workers, len(self.videos)))
        threads = decoder_threads(count)

        def one(path: Path) -> np.ndarray:
            return np.stack(list(sample_frames(path, self.fps, self.backbone.preprocess, threads)))

        def run() -> int:
            with ThreadPoolExecutor(count) as pool:
                self.frames = list(pool.map(one, self.videos))
            return sum(len(f) for f in self.frames)

        return _timed(run)

    def clip(self) -> tuple[float, float]:
        frames = [torch.from_numpy(f) for f in self.frames]
        if self.backbone.device.type == "cuda":
            frames = [f.pin_memory() for f in frames]
        return _timed(lambda: sum(_tower_only(self.backbone, f, self.batch_size) for f in frames))

    def end_to_end(self) -> tuple[float, float]:
        self.runs += 1
        tasks = [VideoTask(f"run{self.runs}-{i}", p, self.fps) for i, p in enumerate(self.videos)]

        def run() -> int:
            done = extract_videos(
                self.backbone, self.store, tasks, batch_size=self.batch_size, workers=self.workers
            )
            return sum(r.frames for r in done)

        return _timed(run)

    def two_stage(self) -> tuple[float, float]:
        folder = self.work / "two_stage"
        folder.mkdir()
        try:
            return _timed(
                lambda: _two_stage(self.ffmpeg, self.videos, self.fps, self.backbone, self.batch_size, folder)
            )
        finally:
            shutil.rmtree(folder)

    def store_bytes(self) -> int:
        return (
            sum(f.stat().st_size for f in (self.store.path / "videos").rglob("*") if f.is_file()) // self.runs
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=Path, help="folder of videos (default: the embedded sample)")
    parser.add_argument("--fps", type=float, help="sampling rate (frames per second; default 1, 0.25 quick)")
    parser.add_argument("--repeat", type=int, default=1, help="process the video list this many times")
    parser.add_argument("--limit", type=int, help="use only the first N videos")
    parser.add_argument(
        "--trials", type=int, default=3, help="rounds of all four measurements; best is reported"
    )
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--pretrained", default="random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--workers", type=int, help="decoding threads (default: as r2 extract, one per usable core but one)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 trial, 0.25 fps unless --fps")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.workers = decode_workers(args.workers)
    args.fps = args.fps or (0.25 if args.quick else 1.0)
    args.trials = 1 if args.quick else args.trials

    import imageio_ffmpeg  # type: ignore[import-untyped]  # bench-only dependency (the `bench` extra)

    folder = args.videos or sample_paths()[0]
    videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)[: args.limit]
    videos = videos * args.repeat
    minutes = sum(probe(p).duration or 0.0 for p in videos) / 60
    backbone = load_backbone(args.arch, args.pretrained, device=args.device)
    _encode(backbone, np.zeros((2, backbone.frame_size, backbone.frame_size, 3), np.uint8), args.batch_size)
    cuda = backbone.device.type == "cuda"
    results: dict[str, object] = {
        "machine": machine(),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} torch threads)",
        "videos": len(videos),
        "video_minutes": round(minutes, 3),
        "fps": args.fps,
        "arch": backbone.name,
        "preprocess": backbone.preprocess.record(),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "trials": args.trials,
    }
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    results["frames_equal_ffmpeg_cli"] = _ffmpeg_matches(ffmpeg, videos[0], args.fps, backbone)
    names = ("decode", "clip", "end_to_end", "two_stage")
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        bench = _Bench(backbone, videos, args.fps, args.batch_size, args.workers, ffmpeg, Path(tmp))
        for _ in range(args.trials):  # interleaved, so slow phases of a shared machine hit all four
            for name in names:
                runs[name].append(getattr(bench, name)())
        results["store_MB_per_video_minute"] = bench.store_bytes() / 1e6 / max(minutes, 1e-9)
    results["runs_wall_cpu"] = runs
    best = {name: max(wall for wall, _ in values) for name, values in runs.items()}
    cpu = {name: max(c for _, c in values) for name, values in runs.items()}
    results.update(best)
    results.update({f"{name}_per_cpu_second": value for name, value in cpu.items()})
    serial = 1 / (1 / best["decode"] + 1 / best["clip"])
    serial_cpu = 1 / (1 / cpu["decode"] + 1 / cpu["clip"])
    results["serial_bound"] = serial
    results["end_to_end_vs_serial_bound"] = best["end_to_end"] / serial
    results["end_to_end_vs_min"] = best["end_to_end"] / min(best["decode"], best["clip"])
    results["end_to_end_vs_two_stage"] = best["end_to_end"] / best["two_stage"]
    results["end_to_end_cpu_vs_serial_cpu"] = cpu["end_to_end"] / serial_cpu

    print(f"Machine: {results['machine']}.")
    print(
        f"device: {results['device']}; {backbone.name}, batch {args.batch_size}, "
        f"{args.workers} decode threads; {len(videos)} videos, {minutes:.2f} min at {args.fps:g} fps; "
        f"best of {args.trials} trials"
    )
    print("| measurement | frames/s (best) | all trials | frames per CPU-second (best) |\n|---|---|---|---|")
    for name in names:
        trials = ", ".join(f"{wall:.1f}" for wall, _ in runs[name])
        print(f"| {name.replace('_', '-')} | {best[name]:.1f} | {trials} | {cpu[name]:.1f} |")
    print(f"| serial bound 1/(1/decode + 1/CLIP) | {serial:.1f} | | {serial_cpu:.1f} |")
    print(
        f"\nend-to-end / serial bound = {results['end_to_end_vs_serial_bound']:.2f} "
        f"(per CPU-second: {results['end_to_end_cpu_vs_serial_cpu']:.2f}); "
        f"end-to-end / min(decode, CLIP) = {results['end_to_end_vs_min']:.2f} (target on a GPU >= 0.8); "
        f"end-to-end / two-stage = {results['end_to_end_vs_two_stage']:.2f}"
    )
    print(
        f"store: {results['store_MB_per_video_minute']:.1f} MB per minute of video; "
        f"frames identical to the ffmpeg command line: {_same_text(results['frames_equal_ffmpeg_cli'])}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
