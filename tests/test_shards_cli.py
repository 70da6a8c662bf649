"""`r2 shards inspect` / `verify` on tiny stores, including every kind of damage verify must catch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from shards.cli import app
from shards.schema import Query
from shards.store import create_store

K, P, C, CQ = 2, 3, 8, 4
runner = CliRunner()


def tokens(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float16)


@pytest.fixture
def good_store(tmp_path, tiny_manifest):
    """3 videos at 0.5 fps (T = 5, 6, 7) with 4 annotated queries; everything consistent."""
    s = create_store(tmp_path / "s.zarr", tiny_manifest((K, P, C, CQ), dataset="qvhighlights", fps=0.5))
    for i, t in enumerate((5, 6, 7)):
        s.write_video(f"v{i}", tokens(i, (t, K, P, C)), 0.5)
    qs = [
        Query(vid=f"v{i % 3}", qid=i, text="q", duration=2.0 * (5 + i % 3), split="train" if i else "val")
        for i in range(4)
    ]
    s.write_queries([q.qid for q in qs], [tokens(10 + q.qid, (2 + q.qid, K, CQ)) for q in qs])
    s.write_annotations(qs)
    return s


def run(*args: str):
    return runner.invoke(app, [*args])


def test_inspect_json_reports_counts_shapes_bytes_and_manifest(good_store):
    result = run("inspect", str(good_store.path), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["manifest"]["backbone"] == "tiny-vit" and info["manifest"]["fps"] == 0.5
    assert info["videos"]["count"] == 3 and info["videos"]["clips_total"] == 18
    assert info["videos"]["clips"] == {"min": 5, "mean": 6.0, "max": 7}
    assert info["videos"]["bytes"] == 18 * K * P * C * 2
    assert info["queries"]["count"] == 4 and info["queries"]["tokens"]["max"] == 5
    assert info["annotations"] == {
        "count": 4,
        "splits": {"train": 3, "val": 1},
        "videos": 3,
        "videos_missing": 0,
    }
    assert info["shapes"] == {"video": [None, K, P, C], "query": [None, K, CQ]}
    assert info["disk"]["bytes"] > info["videos"]["bytes"] and info["partial_writes"] == 0


def test_inspect_text(good_store):
    result = run("inspect", str(good_store.path))
    assert result.exit_code == 0
    assert "videos       3  T min/mean/max 5/6.0/7" in result.stdout and "tiny-vit" in result.stdout
    assert "annotations  4 (train 3, val 1) over 3 videos" in result.stdout


def test_inspect_text_of_an_empty_store_prints_words_not_python(tmp_path, tiny_manifest):
    create_store(tmp_path / "e.zarr", tiny_manifest((K, P, C, CQ), dataset="qvhighlights", fps=0.5))
    result = run("inspect", str(tmp_path / "e.zarr"))
    assert result.exit_code == 0, result.output
    assert "videos       0  T none" in result.stdout and "L none" in result.stdout
    assert "None" not in result.stdout and "{" not in result.stdout


def test_verify_clean_store(good_store):
    result = run("verify", str(good_store.path), "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("ok")


def test_not_a_store_is_a_user_error(tmp_path):
    for command in ("inspect", "verify"):
        result = run(command, str(tmp_path / "nothing.zarr"))
        assert result.exit_code == 2
        assert result.stderr.startswith("error: no feature store at") and "Traceback" not in result.output


def problems(result) -> list[tuple[str, str]]:
    rows = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    return sorted((kind, item) for kind, item, _ in rows)


def test_verify_missing_video_and_missing_query_tokens(good_store):
    good_store.write_annotations([Query(vid="ghost", qid=99, text="q", duration=10.0, split="train")])
    result = run("verify", str(good_store.path), "--quiet")
    assert result.exit_code == 1
    assert problems(result) == [("missing-query-tokens", "99"), ("missing-video", "99")]


def test_verify_partial_videos(good_store):
    (good_store.path / "videos/v1/c.0.0.0.0").unlink()
    shutil.copytree(good_store.path / "videos/v2", good_store.path / "_staging/video.v9+host-1-abc")
    (good_store.path / "videos/v3").mkdir()
    result = run("verify", str(good_store.path), "--quiet")
    assert result.exit_code == 1
    assert problems(result) == [("bad-video", "v1"), ("bad-video", "v3"), ("partial-write", "video.v9")]
    assert "chunk file c.0.0.0.0 is missing" in result.stdout


def test_verify_checksum_mismatch_and_quick(good_store):
    chunk = good_store.path / "videos/v2/c.0.0.0.0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    result = run("verify", str(good_store.path), "--quiet")
    assert result.exit_code == 1 and problems(result) == [("checksum", "v2")]
    assert run("verify", str(good_store.path), "--quick", "--quiet").exit_code == 0
    part = next(p for p in (good_store.path / "queries").iterdir() if p.is_dir())
    with open(part / "c.0.0.0", "ab") as f:
        f.write(b"extra")
    quick = run("verify", str(good_store.path), "--quick", "--quiet")
    assert quick.exit_code == 1
    # the damaged part's queries count as having no tokens
    assert problems(quick) == [("bad-query-part", part.name)] + [
        ("missing-query-tokens", str(i)) for i in range(4)
    ]


def test_verify_duration_mismatch_respects_tolerance(good_store):
    # v0 has T=5 clips at 0.5 fps; claim 20 s (10 clips) for it
    good_store.write_annotations([Query(vid="v0", qid=0, text="q", duration=20.0, split="val")])
    result = run("verify", str(good_store.path), "--quiet")
    assert result.exit_code == 1 and problems(result) == [("duration-mismatch", "v0")]
    assert "T=5 clips but duration 20 s x 0.5 fps = 10 clips" in result.stdout
    assert run("verify", str(good_store.path), "--quiet", "--max-clip-diff", "5").exit_code == 0


def test_verify_reports_an_extraction_killed_before_queries_and_annotations(tmp_path, tiny_manifest):
    store = create_store(tmp_path / "s.zarr", tiny_manifest((K, P, C, CQ), dataset="qvhighlights", fps=0.5))
    result = run("verify", str(store.path), "--quiet")
    assert result.exit_code == 1 and problems(result) == [("incomplete", "store")]
    assert "the store is empty" in result.stdout
    for i, t in enumerate((5, 6)):  # `r2 extract` killed after its videos
        store.write_video(f"v{i}", tokens(i, (t, K, P, C)), 0.5)
    result = run("verify", str(store.path), "--quiet")
    assert result.exit_code == 1 and problems(result) == [("incomplete", "store")]
    assert "2 video(s) and 0 query part(s) but no annotations: nothing to train on" in result.stdout
    qs = [Query(vid=f"v{i}", qid=i, text="q", duration=2.0 * (5 + i), split="train") for i in range(2)]
    store.write_annotations(qs)  # annotations, but no query tokens at all
    result = run("verify", str(store.path), "--quiet")
    assert result.exit_code == 1
    assert problems(result) == [("incomplete", "store"), *[("missing-query-tokens", str(i)) for i in (0, 1)]]
    assert "2 annotations but 2 video(s) and 0 query part(s)" in result.stdout
    store.write_queries([0, 1], [tokens(10, (3, K, CQ)), tokens(11, (4, K, CQ))])
    assert run("verify", str(store.path), "--quiet").exit_code == 0


def test_verify_reports_non_finite_tokens_unless_quick(good_store, monkeypatch):
    monkeypatch.setattr("shards.store.check_finite", lambda array, what: None, raising=False)
    bad = tokens(0, (5, K, P, C))
    bad[3, 0, 1, 2] = np.nan
    good_store.write_video("v0", bad, 0.5)
    result = run("verify", str(good_store.path), "--quiet")
    assert result.exit_code == 1 and problems(result) == [("non-finite", "v0")]
    assert "1 clip(s) hold NaN or Inf tokens (clips 3)" in result.stdout
    assert run("verify", str(good_store.path), "--quick", "--quiet").exit_code == 0
