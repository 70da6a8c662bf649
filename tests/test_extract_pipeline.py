"""The extraction pipeline's defaults and overlap: decode workers from the core count, batches in flight,
frames made as the backbone's preprocessing says, the token-pool and dtype options
(extract/config.py, extract/pipeline.py, extract/cli.py)."""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import extract.job
import extract.pipeline
from extract.backbone import ClipBackbone, load_backbone
from extract.config import (
    MAX_DECODE_WORKERS,
    ExtractConfig,
    decode_workers,
    decoder_threads,
    sample_paths,
)
from extract.frames import preprocess, sample_frames
from extract.job import ExtractSummary
from extract.pipeline import VideoTask, extract_videos
from r2.cli import build_app
from shards.backbones import Preprocess
from shards.device import usable_cores
from shards.store import create_store
from tests.helpers.videos import make_video, truncate


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    return load_backbone("ViT-B-32", "random", device="cpu")


def _cores(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Pretend this process may run on ``count`` cores (its affinity mask)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(count)), raising=False)


@pytest.mark.parametrize(("cores", "auto"), [(1, 1), (2, 1), (16, 15), (24, 23), (64, MAX_DECODE_WORKERS)])
def test_default_decode_workers_follow_the_core_count(monkeypatch, cores, auto) -> None:
    _cores(monkeypatch, cores)
    assert usable_cores() == cores
    assert decode_workers(None) == auto
    assert decode_workers(3) == 3  # an explicit number wins, whatever the cores
    assert decoder_threads(auto) == max(1, cores // auto)


def test_decode_workers_share_the_host_between_processes(monkeypatch) -> None:
    _cores(monkeypatch, 16)
    assert [decode_workers(None, processes=p) for p in (1, 2, 4, 16)] == [15, 7, 3, 1]
    assert decoder_threads(4) == 4 and decoder_threads(32) == 1


def test_cpu_count_without_an_affinity_mask(monkeypatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert usable_cores() == 8 and decode_workers(None) == 7
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert usable_cores() == 1 and decode_workers(None) == 1


@pytest.mark.parametrize(("workers", "cores", "decoders", "threads"), [(None, 5, 4, 1), (2, 5, 2, 2)])
def test_pipeline_starts_the_decoders_the_rule_gives(
    backbone, tmp_path, monkeypatch, workers, cores, decoders, threads
) -> None:
    _cores(monkeypatch, cores)
    started: list[tuple[str, int]] = []
    lock = threading.Lock()
    original = extract.pipeline._decode_loop

    def spy(tasks, todo, out, size, ffmpeg_threads, stop) -> None:
        with lock:
            started.append((threading.current_thread().name, ffmpeg_threads))
        original(tasks, todo, out, size, ffmpeg_threads, stop)

    monkeypatch.setattr(extract.pipeline, "_decode_loop", spy)
    tasks = [VideoTask(f"v{i}", make_video(tmp_path / f"v{i}.mp4", frames=5, rate=10), 2.0) for i in range(6)]
    store = create_store(tmp_path / "s.zarr", backbone.manifest("charades", 2.0))
    results = extract_videos(backbone, store, tasks, batch_size=4, workers=workers)
    assert sorted(r.vid for r in results if r.error is None) == [t.vid for t in tasks]
    assert sorted(started) == [(f"decode-{i}", threads) for i in range(decoders)]


def test_frames_do_not_depend_on_ffmpeg_threads() -> None:
    videos, _ = sample_paths()
    path = videos / "univtg_charades.mp4"
    frames = {n: np.stack(list(sample_frames(path, 0.5, threads=n))) for n in (0, 1, 3)}
    assert frames[0].shape == (15, 224, 224, 3)
    assert all(np.array_equal(frames[0], f) for f in frames.values())


def _extract_with(backbone, tmp_path, tasks, depth: int, monkeypatch) -> tuple[dict, dict]:
    """Results and stored tokens of ``tasks`` with ``depth`` batches in flight (one decoder: the
    batches are the same whatever the depth)."""
    monkeypatch.setattr(extract.pipeline, "BATCHES_IN_FLIGHT", depth)
    store = create_store(tmp_path / f"depth{depth}.zarr", backbone.manifest("charades", 1.0))
    results = extract_videos(backbone, store, tasks, batch_size=3, workers=1)
    return {r.vid: (r.frames, r.error) for r in results}, {v: store.read_video(v) for v in store.video_ids()}


def test_batches_in_flight_give_the_synchronous_store(backbone, tmp_path, monkeypatch) -> None:
    whole = make_video(tmp_path / "whole.mp4", frames=200, rate=10, faststart=True)
    tasks = [
        VideoTask("first", make_video(tmp_path / "first.mp4", frames=50, rate=10), 1.0),
        # 9 frames decode (a chunk of 8 reaches the tower) before the truncation is found
        VideoTask("cut", truncate(whole, tmp_path / "cut.mp4"), 1.0),
        VideoTask("last", make_video(tmp_path / "last.mp4", frames=40, rate=10), 1.0),
    ]
    sync_results, sync_tokens = _extract_with(backbone, tmp_path, tasks, 0, monkeypatch)
    assert {v: n for v, (n, _) in sync_results.items()} == {"first": 5, "cut": 0, "last": 4}
    assert "truncated" in sync_results["cut"][1]
    assert sorted(sync_tokens) == ["first", "last"]
    for depth in (1, 2):
        results, tokens = _extract_with(backbone, tmp_path, tasks, depth, monkeypatch)
        assert results == sync_results
        assert sorted(tokens) == sorted(sync_tokens)
        for vid, expected in sync_tokens.items():
            assert tokens[vid].dtype == np.float16 and tokens[vid].shape == (len(expected), 4, 50, 768)
            assert np.array_equal(tokens[vid], expected), vid


@pytest.fixture
def extract_configs(monkeypatch) -> list[ExtractConfig]:
    """The configs ``r2 extract`` hands to the job (which is not run): one per invocation."""
    seen: list[ExtractConfig] = []

    def fake_run(cfg: ExtractConfig, **given: object) -> ExtractSummary:
        seen.append(cfg)
        return ExtractSummary(store=cfg.out, videos=0)

    monkeypatch.setattr(extract.job, "run_extraction", fake_run)
    return seen


def test_cli_workers_auto_or_a_number(tmp_path, extract_configs) -> None:
    seen = extract_configs
    runner = CliRunner()
    base = ["extract", "--sample", "--out", str(tmp_path / "s.zarr"), "--no-progress"]
    for args, expected in (([], None), (["--workers", "auto"], None), (["--workers", "3"], 3)):
        result = runner.invoke(build_app(), [*base, *args])
        assert result.exit_code == 0, result.output
        assert seen[-1].workers == expected
    assert ExtractConfig("charades", tmp_path, [], tmp_path).workers is None
    for bad in ("0", "two"):
        result = runner.invoke(build_app(), [*base, "--workers", bad])
        assert result.exit_code == 2 and "--workers must be 'auto' or a number" in result.output


def test_frames_are_made_as_the_backbones_preprocessing_says(backbone, tmp_path) -> None:
    squash = Preprocess(224, "squash", "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    squashing = dataclasses.replace(backbone, preprocess=squash)
    path = make_video(tmp_path / "wide.mp4", width=96, height=48, frames=20, rate=10)
    store = create_store(tmp_path / "s.zarr", squashing.manifest("charades", 1.0))
    assert store.manifest.preprocess["resize_mode"] == "squash"
    extract_videos(squashing, store, [VideoTask("wide", path, 1.0)], batch_size=4, workers=1)
    frames = np.stack(list(sample_frames(path, 1.0, squash)))
    expected = backbone.encode_frames(preprocess(frames, spec=squash)).to(torch.float16).numpy()
    np.testing.assert_array_equal(store.read_video("wide"), expected)
    cropped = np.stack(list(sample_frames(path, 1.0)))
    reference = backbone.encode_frames(preprocess(cropped)).to(torch.float16).numpy()
    assert np.abs(store.read_video("wide").astype(np.float32) - reference).max() > 0.1


def test_cli_token_pool_and_dtype_reach_the_config(tmp_path, extract_configs) -> None:
    seen = extract_configs
    runner = CliRunner()
    base = ["extract", "--sample", "--out", str(tmp_path / "s.zarr"), "--no-progress"]
    pooled = ["--arch", "ViT-B-16-SigLIP", "--token-pool", "2", "--dtype", "int8"]
    for args, expected in (([], (1, "float16")), (pooled, (2, "int8"))):
        result = runner.invoke(build_app(), [*base, *args])
        assert result.exit_code == 0, result.output
        assert (seen[-1].token_pool, seen[-1].dtype) == expected
    for args, message in (
        (["--token-pool", "0"], "--token-pool must be a positive integer, got 0"),
        (["--token-pool", "2"], "--token-pool 2 does not divide the 7x7 patch grid of ViT-B-32"),
        (["--arch", "ViT-B-16-SigLIP", "--token-pool", "3"], "--token-pool 3 does not divide the 14x14"),
        (["--dtype", "bfloat16"], "token dtype must be float16 or int8, got 'bfloat16'"),
    ):
        result = runner.invoke(build_app(), [*base, *args])
        assert result.exit_code == 2 and message in result.output, result.output
    assert len(seen) == 2  # refused before anything ran
