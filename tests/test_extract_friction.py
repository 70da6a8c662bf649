"""`r2 extract` on the everyday path: which annotation files, custom videos without durations, videos
at odds with their annotations, honest counts, hints, early user errors, progress lines, SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import extract.job
from extract.backbone import ClipBackbone, load_backbone
from extract.config import ExtractConfig, find_video
from extract.frames import probe, video_duration
from extract.job import WARNINGS_FILE, plan_videos, run_extraction
from r2.cli import build_app
from shards.datasets import get_dataset
from shards.errors import VideoError
from shards.schema import Query
from shards.store import open_store
from shards.verify import verify_store
from tests.helpers.videos import make_video

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def r2_extract(*args: str):
    return runner.invoke(build_app(), ["extract", *args, "--pretrained", "random", "--device", "cpu"])


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _moment(qid: int, vid: str, duration: float, **extra: object) -> dict:
    record = {"qid": qid, "query": f"sentence {qid}", "duration": duration, "vid": vid}
    return {**record, "relevant_windows": [[0, 1]], **extra}


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    return load_backbone("ViT-B-32", "random", device="cpu")


def test_a_folder_gives_one_file_per_split_and_the_line_names_them(tmp_path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "a.mp4", frames=40, rate=10)  # 4 s: 2 clips at QVHighlights' 0.5 fps
    folder = tmp_path / "annotations"
    folder.mkdir()
    _jsonl(folder / "highlight_train_release.jsonl", [_moment(1, "a", 4.0)])
    _jsonl(folder / "highlight_test_with_gt.jsonl", [_moment(2, "a", 4.0)])
    _jsonl(
        folder / "highlight_test_release.jsonl", [{"qid": 2, "query": "other", "duration": 4.0, "vid": "a"}]
    )
    out = tmp_path / "s.zarr"
    result = r2_extract(
        "--dataset", "qvhighlights", "--videos", str(videos), "--annotations", str(folder), "--out", str(out)
    )
    assert result.exit_code == 0, result.output  # both test files hold qid 2: only one was read
    lines = [line for line in result.output.splitlines() if line.startswith("annotations: ")]
    assert lines == [
        f"annotations: train {folder / 'highlight_train_release.jsonl'}, test "
        f"{folder / 'highlight_test_with_gt.jsonl'}; not used: highlight_test_release.jsonl "
        "(test: highlight_test_with_gt.jsonl preferred)"
    ]
    assert {q.qid: (q.split, q.text) for q in open_store(out).annotations()} == {
        1: ("train", "sentence 1"),
        2: ("test", "sentence 2"),
    }


def test_custom_lines_without_duration_read_it_from_the_video(tmp_path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "kitchen.mp4", frames=40, rate=10)
    mine = _jsonl(
        tmp_path / "mine.jsonl",
        [
            {"video": "kitchen.mp4", "query": "a man opens the fridge", "start": 0.5, "end": 2.0},
            {"vid": "kitchen", "query": "he closes it", "start": 2.0, "end": 3.5},
        ],
    )
    out = tmp_path / "s.zarr"
    args = [
        "--dataset",
        "custom",
        "--videos",
        str(videos),
        "--annotations",
        f"{mine}:train",
        "--out",
        str(out),
    ]
    result = r2_extract(*args)
    assert result.exit_code == 0, result.output
    assert f"annotations: train {mine}\n" in result.output
    queries = open_store(out).annotations()
    assert [q.split for q in queries] == ["train", "train"]
    assert [q.duration for q in queries] == [video_duration(videos / "kitchen.mp4")] * 2
    assert queries[0].duration == pytest.approx(4.0, abs=0.1)
    assert verify_store(out).ok


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (None, "video 'gone' has no 'duration' in the annotations and there is no gone{.mp4"),
        (
            lambda path: path.write_bytes(b"not a video" * 10),
            "cannot read the length of video 'gone', whose lines give no 'duration': ",
        ),
    ],
)
def test_custom_video_whose_length_cannot_be_read_is_one_clear_error(tmp_path, make, message) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    if make is not None:
        make(videos / "gone.mp4")
    mine = _jsonl(tmp_path / "mine_train.jsonl", [{"vid": "gone", "query": "x", "start": 0, "end": 1}])
    out = tmp_path / "s.zarr"
    result = r2_extract(
        "--dataset", "custom", "--videos", str(videos), "--annotations", str(mine), "--out", str(out)
    )
    assert result.exit_code == 2, result.output
    assert f"error: {message}" in result.output and str(videos) in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_video_duration_reads_the_metadata_probe_reads(tmp_path) -> None:
    path = make_video(tmp_path / "v.mp4", frames=25, rate=10)
    assert video_duration(path) == probe(path).duration == pytest.approx(2.5, abs=0.01)
    (tmp_path / "bad.mp4").write_bytes(b"garbage" * 20)
    with pytest.raises(VideoError, match="bad.mp4: not a readable video"):
        video_duration(tmp_path / "bad.mp4")


def test_videos_at_odds_with_their_duration_are_reported_like_verify_does(tmp_path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "short.mp4", frames=20, rate=10)  # 2 s, annotated 30 s
    make_video(videos / "fine.mp4", frames=20, rate=10)
    ann = _jsonl(tmp_path / "charades_test.jsonl", [_moment(0, "short", 30.0), _moment(1, "fine", 2.0)])
    out = tmp_path / "s.zarr"
    result = r2_extract(
        "--dataset", "charades", "--videos", str(videos), "--annotations", str(ann), "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    assert (
        "warning: 1 video(s) shorter or longer than their annotated duration (by more than 3 clips"
        in result.output
    )
    assert "  short: annotated 30 s, video 2 s\n" in result.output
    assert f"all 1 are listed in {out / WARNINGS_FILE}" in result.output
    (row,) = [json.loads(line) for line in (out / WARNINGS_FILE).read_text().splitlines()]
    assert (row["vid"], row["kind"], row["annotated_s"], row["video_s"]) == (
        "short",
        "duration-mismatch",
        30.0,
        2.0,
    )
    assert row["path"] == str(videos / "short.mp4")
    report = verify_store(out)
    assert [(p.kind, p.item, p.detail) for p in report.problems] == [
        ("duration-mismatch", "short", row["detail"])
    ]

    _jsonl(ann, [_moment(0, "short", 2.0), _moment(1, "fine", 2.0)])  # the annotation fixed: no warning left
    again = r2_extract(
        "--dataset", "charades", "--videos", str(videos), "--annotations", str(ann), "--out", str(out)
    )
    assert again.exit_code == 0 and "warning:" not in again.output
    assert not (out / WARNINGS_FILE).exists() and verify_store(out).ok


def test_new_queries_count_the_queries_added_to_the_store(backbone, tmp_path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "a.mp4", frames=20, rate=10)
    rows = [
        _moment(0, "a", 2.0),
        _moment(1, "a", 2.0),
        _moment(2, "b", 2.0),
        _moment(3, "b", 2.0),
        _moment(4, "b", 2.0),
    ]
    ann = _jsonl(tmp_path / "charades_train.jsonl", rows)
    cfg = ExtractConfig("charades", videos, [ann], tmp_path / "s.zarr", pretrained="random", progress=False)
    first = run_extraction(cfg, backbone)
    assert (first.extracted, set(first.failures), first.queries_written, first.annotations) == (
        1,
        {"b"},
        2,
        2,
    )
    make_video(videos / "b.mp4", frames=20, rate=10)  # b's queries are added by the run that extracts b
    second = run_extraction(cfg, backbone)
    assert (second.extracted, second.already_done, second.queries_written, second.annotations) == (1, 1, 3, 5)
    assert sorted(open_store(cfg.out).query_ids()) == [0, 1, 2, 3, 4]
    third = run_extraction(cfg, backbone)
    assert (third.extracted, third.queries_written, third.annotations) == (0, 0, 5)

    rows[0]["query"] = "a new sentence"  # a query whose sentence changed gets new tokens, and is not new
    _jsonl(ann, rows)
    before = open_store(cfg.out).read_query(0)
    fourth = run_extraction(cfg, backbone)
    assert fourth.queries_written == 0
    assert not np.array_equal(open_store(cfg.out).read_query(0), before) and verify_store(cfg.out).ok


def test_a_tacos_video_without_its_camera_suffix_gets_a_hint(tmp_path) -> None:
    make_video(tmp_path / "s13-d21.avi", frames=5, rate=5)
    make_video(tmp_path / "s14-d22-cam-002.avi", frames=5, rate=5)
    queries = [
        Query(vid=vid, qid=i, text="x", duration=1.0, split="test", moments=[[0.0, 1.0]])
        for i, vid in enumerate(("s13-d21", "s14-d22", "s15-d23"))
    ]
    cfg = ExtractConfig("tacos", tmp_path, [], tmp_path / "s.zarr")
    tasks, failures = plan_videos(get_dataset("tacos"), queries, cfg)
    assert [t.path.name for t in tasks] == ["s14-d22-cam-002.avi"]
    assert failures["s13-d21"] == (
        f"missing file: no s13-d21-cam-002{{.mp4,.mkv,.webm,.avi,.mov}} in {tmp_path}; found s13-d21.avi: "
        "TACoS videos are named <vid>-cam-002.<ext>; rename it to s13-d21-cam-002.avi"
    )
    assert "found" not in failures["s15-d23"]
    assert find_video(tmp_path, "s13-d21", (".mp4", ".avi")) == tmp_path / "s13-d21.avi"


def _run_cli_in_subprocess(args: list[str], cwd: Path) -> tuple[int, list[str], str]:
    """``r2 ARGS`` in a fresh interpreter: (exit status, heavy modules it imported, stderr)."""
    code = (
        "import sys\nfrom r2.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as stop:\n    status = stop.code\n"
        "print(status, ','.join(m for m in ('torch', 'open_clip') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=60
    )
    status, _, heavy = done.stdout.strip().splitlines()[-1].partition(" ")
    return int(status), [m for m in heavy.split(",") if m], done.stderr


@pytest.mark.parametrize(
    ("dataset", "lines", "message"),
    [
        ("nope", [_moment(0, "a", 2.0)], "error: unknown dataset 'nope'"),
        ("charades", [_moment(0, "a", 2.0), _moment(0, "b", 2.0)], "duplicate query id 0, first used at"),
        ("charades", [{"qid": 0, "vid": "a", "duration": 2.0}], "missing required field 'query'"),
    ],
)
def test_user_errors_come_before_torch_is_imported(tmp_path, dataset, lines, message) -> None:
    ann = _jsonl(tmp_path / "charades_train.jsonl", lines)
    args = [
        "extract",
        "--dataset",
        dataset,
        "--videos",
        str(tmp_path),
        "--annotations",
        str(ann),
        "--out",
        "o",
    ]
    status, heavy, stderr = _run_cli_in_subprocess(args, tmp_path)
    assert (status, heavy) == (2, []), stderr
    assert message in stderr and not (tmp_path / "o").exists()


def test_batch_jobs_get_progress_lines(tmp_path, caplog) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for vid in ("a", "b"):
        make_video(videos / f"{vid}.mp4", frames=20, rate=10)
    ann = _jsonl(tmp_path / "charades_test.jsonl", [_moment(0, "a", 2.0), _moment(1, "b", 2.0)])
    args = [
        "--dataset",
        "charades",
        "--videos",
        str(videos),
        "--annotations",
        str(ann),
        "--out",
        str(tmp_path / "s"),
    ]
    caplog.set_level(logging.INFO, logger="extract")
    result = r2_extract(
        *args, "--progress-interval", "0", "--workers", "1"
    )  # CliRunner: stderr is no terminal
    assert result.exit_code == 0, result.output
    lines = [r.getMessage() for r in caplog.records if r.name == "extract.job"]
    assert [line.split(",")[:2] for line in lines] == [
        ["extract: 1/2 videos", " 2 frames"],
        ["extract: 2/2 videos", " 4 frames"],
    ]
    assert " frames/s, ETA " in lines[0]
    caplog.clear()
    assert r2_extract(*args, "--progress-interval", "0", "--no-progress").exit_code == 0
    assert not [r for r in caplog.records if r.name == "extract.job"]


def test_ctrl_c_finishes_the_store_and_exits_130(tmp_path, monkeypatch) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for vid in ("a", "b", "c"):
        make_video(videos / f"{vid}.mp4", frames=20, rate=10)
    ann = _jsonl(tmp_path / "charades_test.jsonl", [_moment(i, v, 2.0) for i, v in enumerate("abc")])
    real = extract.job.extract_videos

    def first_then_ctrl_c(backbone, store, tasks, **options):
        real(backbone, store, tasks[:1], **options)
        raise KeyboardInterrupt

    monkeypatch.setattr(extract.job, "extract_videos", first_then_ctrl_c)
    out = tmp_path / "s.zarr"
    args = ["--dataset", "charades", "--videos", str(videos), "--annotations", str(ann), "--out", str(out)]
    result = r2_extract(*args)
    assert result.exit_code == 130, result.output
    assert f"interrupted: 1 video(s) extracted into {out}; re-run the same command to resume" in result.output
    store = open_store(out)
    assert (
        store.video_ids() == ["a"]
        and [q.vid for q in store.annotations()] == ["a"]
        and store.query_ids() == [0]
    )
    assert verify_store(out).ok


def _done(out: Path) -> list[str]:
    folder = out / "videos"
    return sorted(p.name for p in folder.iterdir() if (p / "zarr.json").is_file()) if folder.is_dir() else []


def test_sigterm_stops_like_ctrl_c_with_exit_143_and_a_rerun_resumes(tmp_path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    names = [f"clip{i}" for i in range(8)]
    for vid in names:
        make_video(videos / f"{vid}.mp4", frames=30, rate=10)
    ann = _jsonl(tmp_path / "charades_train.jsonl", [_moment(i, v, 3.0) for i, v in enumerate(names)])
    out = tmp_path / "s.zarr"
    command = [
        sys.executable, "-m", "r2", "extract", "--dataset", "charades", "--videos", str(videos),
        "--annotations", str(ann), "--out", str(out), "--pretrained", "random", "--device", "cpu",
        "--batch-size", "2", "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    try:
        while not _done(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stdout + stderr
    finished = _done(out)
    assert 1 <= len(finished) < len(names), "the extraction finished before SIGTERM"
    assert f"terminated (SIGTERM): {len(finished)} video(s) extracted into {out}; re-run" in stdout
    assert "Traceback" not in stderr
    assert verify_store(out).ok, verify_store(out).problems

    rerun = subprocess.run([*command, "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(finished)} already done" in rerun.stdout
    assert open_store(out).video_ids() == names and verify_store(out).ok
