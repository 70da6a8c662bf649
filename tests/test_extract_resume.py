"""`kill -9` during an extraction loses nothing already marked done; a rerun completes the store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shards.store import open_store
from shards.verify import verify_store
from tests.helpers.videos import make_video

VIDEOS = [f"clip{i}" for i in range(4)]


def _command(folder: Path, ann: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "r2",
        "extract",
        "--dataset",
        "charades",
        "--videos",
        str(folder),
        "--annotations",
        str(ann),
        "--out",
        str(out),
        "--pretrained",
        "random",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--workers",
        "1",
        "--no-progress",
    ]


def _done(out: Path) -> list[str]:
    videos = out / "videos"
    return sorted(p.name for p in videos.iterdir() if (p / "zarr.json").is_file()) if videos.is_dir() else []


def test_kill_9_then_rerun(tmp_path, write_charades) -> None:
    folder = tmp_path / "videos"
    folder.mkdir()
    for vid in VIDEOS:
        make_video(folder / f"{vid}.mp4", frames=30, rate=10)  # 3 s -> 3 frames at 1 fps
    rows = [(i, v, f"clip number {i}") for i, v in enumerate(VIDEOS)]
    ann = write_charades(tmp_path / "charades_train.jsonl", rows, 3.0, window=(0, 2))
    out = tmp_path / "store.zarr"
    proc = subprocess.Popen(_command(folder, ann, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not _done(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the extraction finished before it could be killed"
    finished = _done(out)
    assert 1 <= len(finished) < len(VIDEOS)
    before = {vid: open_store(out).read_video(vid) for vid in finished}
    stamps = {vid: (out / "videos" / vid / "zarr.json").stat().st_mtime_ns for vid in finished}

    rerun = subprocess.run(_command(folder, ann, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(finished)} already done" in rerun.stdout
    store = open_store(out)
    assert store.video_ids() == VIDEOS
    for vid in finished:  # kept as they were, not redone
        assert (out / "videos" / vid / "zarr.json").stat().st_mtime_ns == stamps[vid]
        assert (store.read_video(vid) == before[vid]).all()
    assert all(store.video_length(vid) == 3 for vid in VIDEOS)
    assert sorted(store.query_ids()) == list(range(len(VIDEOS)))
    report = verify_store(out)
    assert report.ok, report.problems
