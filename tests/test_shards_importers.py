"""Importers of official .npy caches and HDF5 token files (tiny shapes, real annotation excerpts)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from shards.annotations import load_annotations
from shards.cli import app
from shards.errors import StoreError
from shards.importers import import_h5, import_npy
from shards.store import open_store

ANN = Path(__file__).parent / "data" / "annotations"
TACOS = ANN / "tacos_train_excerpt.jsonl"
CHARADES = ANN / "charades_train_excerpt.jsonl"
YOUTUBE = ANN / "youtube_highlight_val_excerpt.jsonl"
K, P, C, CQ = 2, 3, 8, 4
runner = CliRunner()


def arr(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float16)


def write_npy_cache(root: Path, vids: list[str], qids: list, suffix: str = "") -> tuple[Path, Path]:
    vdir, qdir = root / "vid", root / "txt"
    vdir.mkdir()
    qdir.mkdir()
    for i, vid in enumerate(vids):
        np.save(vdir / f"{vid}{suffix}.npy", arr(i, (4 + i, K, P, C)))
    for i, qid in enumerate(qids):
        np.save(qdir / f"{qid}.npy", arr(100 + i, (2 + i % 3, K, CQ)))
    return vdir, qdir


def test_import_npy_tacos_roundtrip_and_resume(tmp_path):
    queries = load_annotations("tacos", TACOS)
    vids = ["s17-d69", "s99-d01"]  # the second has no annotation: imported all the same
    qids = [q.qid for q in queries][:-1]  # the last query has no token file
    vdir, qdir = write_npy_cache(tmp_path, vids, qids, suffix="-cam-002")
    out = tmp_path / "tacos.zarr"
    kwargs = dict(
        dataset="tacos",
        video_dir=vdir,
        query_dir=qdir,
        annotations=[TACOS],
        out=out,
        backbone="tiny-vit",
        frame_size=224,
        progress=False,
    )
    summary = import_npy(**kwargs)
    assert (summary.videos_written, summary.queries_written, summary.annotations) == (2, 9, 10)
    assert summary.queries_without_tokens == [queries[-1].qid]
    store = open_store(out)
    m = store.manifest
    assert (m.dataset, m.fps, m.layers, m.video_tokens, m.video_width, m.text_width) == (
        "tacos",
        0.5,
        K,
        P,
        C,
        CQ,
    )
    assert (m.backbone, m.pretrained, m.weights_sha256) == ("tiny-vit", "openai", "unknown")
    assert store.video_ids() == vids
    np.testing.assert_array_equal(store.read_video("s99-d01"), arr(1, (5, K, P, C)))
    np.testing.assert_array_equal(store.read_query(qids[4]), arr(104, (3, K, CQ)))
    assert store.annotations() == queries

    again = import_npy(**kwargs)
    assert (again.videos_written, again.videos_skipped, again.queries_written, again.queries_skipped) == (
        0,
        2,
        0,
        9,
    )
    shutil.rmtree(out / "videos" / "s99-d01")
    assert import_npy(**kwargs).videos_written == 1
    np.testing.assert_array_equal(open_store(out).read_video("s99-d01"), arr(1, (5, K, P, C)))


def test_import_npy_cli_keeps_int_query_ids(tmp_path):
    queries = load_annotations("charades", CHARADES)
    vids = sorted({q.vid for q in queries})
    vdir, qdir = write_npy_cache(tmp_path, vids, [q.qid for q in queries])
    out = tmp_path / "ch.zarr"
    args = ["import-npy", "--dataset", "charades", "--video-dir", str(vdir), "--query-dir", str(qdir)]
    args += ["--annotations", str(CHARADES), "--annotations", str(CHARADES), "--out", str(out)]
    args += ["--backbone", "tiny-vit", "--frame-size", "224", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"videos      {len(vids)} written" in result.stdout
    store = open_store(out)
    assert sorted(store.query_ids()) == list(range(10)) and store.manifest.fps == 1.0
    assert (
        runner.invoke(app, ["verify", str(out), "--quick", "--max-clip-diff", "100", "--quiet"]).exit_code
        == 0
    )


def test_pooled_features_are_refused_with_their_shape(tmp_path):
    vdir = tmp_path / "vid"
    vdir.mkdir()
    np.save(vdir / "AO8RW.npy", np.zeros((6, 512), np.float16))
    out = tmp_path / "x.zarr"
    result = runner.invoke(app, ["import-npy", "-d", "charades", "--video-dir", str(vdir), "--out", str(out)])
    assert result.exit_code == 2
    assert "pooled features of shape (6, 512) cannot feed the R² block" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("videos", "query", "backbone", "message"),
    [
        ([(4, 2, P, C), (4, 3, P, C)], None, "tiny-vit", r"\(k, P, C\) = \(3, 3, 8\).*has \(2, 3, 8\)"),
        ([(4, K, P, C)], (3, 3, CQ), "tiny-vit", r"shape \(3, 3, 4\) has k=3 layers, the videos have 2"),
        ([(4, K, P, C)], (3, CQ), "tiny-vit", r"shape \(3, 4\) is not query tokens \(L, k, Cq\)"),
        ([(4, K, P, C)], None, "ViT-B-32", r"P=3, C=8 but backbone ViT-B-32 gives P=50, C=768"),
        ([(K, P, C)], None, "tiny-vit", r"shape \(2, 3, 8\) is not video tokens"),
    ],
)
def test_wrong_shapes_are_refused(tmp_path, videos, query, backbone, message):
    vdir, qdir = tmp_path / "vid", tmp_path / "txt"
    vdir.mkdir()
    qdir.mkdir()
    for i, shape in enumerate(videos):
        np.save(vdir / f"v{i}.npy", np.zeros(shape, np.float16))
    if query is not None:
        np.save(qdir / "1.npy", np.zeros(query, np.float16))
    with pytest.raises(StoreError, match=message):
        import_npy(
            dataset="charades",
            video_dir=vdir,
            query_dir=qdir,
            out=tmp_path / "x.zarr",
            backbone=backbone,
            frame_size=224,
            progress=False,
        )
    assert not (tmp_path / "x.zarr").exists()


def test_import_into_store_with_other_manifest_is_refused(tmp_path):
    vdir, qdir = write_npy_cache(tmp_path, ["AO8RW"], [0])
    kwargs = dict(
        dataset="charades",
        video_dir=vdir,
        query_dir=qdir,
        out=tmp_path / "x.zarr",
        backbone="tiny-vit",
        progress=False,
    )
    import_npy(**kwargs, frame_size=224)
    with pytest.raises(StoreError, match="frame_size is 224 in the store but 336 was expected"):
        import_npy(**kwargs, frame_size=336)


def test_import_h5_with_per_video_fps(tmp_path):
    queries = load_annotations("youtube", YOUTUBE)
    h5 = tmp_path / "yt.h5"
    with h5py.File(h5, "w") as f:
        for i, q in enumerate(queries):
            f[q.vid] = arr(i, (3 + i, K, P, C))
            f[f"queries/{q.qid}"] = arr(50 + i, (2, K, CQ))
    out = tmp_path / "yt.zarr"
    args = ["import-h5", "-d", "youtube", "--h5", str(h5), "-a", str(YOUTUBE), "-o", str(out)]
    result = runner.invoke(app, [*args, "--backbone", "tiny-vit", "--frame-size", "224", "-q"])
    assert result.exit_code == 0, result.output
    store = open_store(out)
    assert store.manifest.fps is None and len(store.video_ids()) == len(queries)
    for i, q in enumerate(queries):
        assert store.video_fps(q.vid) == pytest.approx(q.fps)
        np.testing.assert_array_equal(store.read_video(q.vid), arr(i, (3 + i, K, P, C)))
        np.testing.assert_array_equal(store.read_query(q.qid), arr(50 + i, (2, K, CQ)))


def test_import_h5_refuses_pooled_and_missing_fps(tmp_path):
    h5 = tmp_path / "pooled.h5"
    with h5py.File(h5, "w") as f:
        f["fXx44D1sqUw"] = np.zeros((12, 512), np.float32)
    with pytest.raises(StoreError, match=r"pooled features of shape \(12, 512\)"):
        import_h5(dataset="youtube", h5_path=h5, out=tmp_path / "a.zarr", backbone="tiny-vit", progress=False)
    with h5py.File(tmp_path / "ok.h5", "w") as f:
        f["fXx44D1sqUw"] = np.zeros((3, K, P, C), np.float16)
        f["queries/fXx44D1sqUw"] = np.zeros((2, K, CQ), np.float16)
    with pytest.raises(StoreError, match="samples every video at its own rate.*'fXx44D1sqUw'"):
        import_h5(
            dataset="youtube",
            h5_path=tmp_path / "ok.h5",
            out=tmp_path / "b.zarr",
            backbone="tiny-vit",
            frame_size=224,
            progress=False,
        )


def test_import_with_an_openai_arch_name_needs_no_frame_size(tmp_path):
    vdir = tmp_path / "vid"
    vdir.mkdir()
    np.save(vdir / "AO8RW.npy", arr(0, (3, K, 50, 768)))
    out = tmp_path / "b32.zarr"
    args = ["import-npy", "-d", "charades", "--video-dir", str(vdir), "--out", str(out), "--arch", "ViT-B/32"]
    result = runner.invoke(app, [*args, "-q"])
    assert result.exit_code == 0, result.output
    m = open_store(out).manifest
    assert (m.backbone, m.frame_size, m.video_tokens, m.video_width, m.text_width) == (
        "ViT-B-32",
        224,
        50,
        768,
        512,
    )
    result = runner.invoke(app, [*args, "--frame-size", "336", "-q"])
    assert result.exit_code == 2 and "takes 224 px frames, not --frame-size 336" in result.stderr


def test_import_npy_refuses_non_finite_tokens_naming_the_file(tmp_path):
    queries = load_annotations("charades", CHARADES)
    vids = sorted({q.vid for q in queries})
    vdir, qdir = write_npy_cache(tmp_path, vids, [q.qid for q in queries])
    bad = vdir / f"{vids[1]}.npy"
    tokens = np.load(bad).astype(np.float32)
    tokens[1, 0, 2, 3] = np.nan
    np.save(bad, tokens)
    out = tmp_path / "ch.zarr"
    args = ["import-npy", "-d", "charades", "--video-dir", str(vdir), "--query-dir", str(qdir)]
    args += ["-a", str(CHARADES), "--out", str(out), "--backbone", "tiny-vit", "--frame-size", "224", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {bad}: 1 value(s) not finite (NaN or Inf), the first at index (1, 0, 2, 3); the store "
        "refuses non-finite tokens (training on them skips every step): fix or re-extract the features\n"
    )
    assert not open_store(out).has_video(vids[1])
    np.save(bad, np.nan_to_num(tokens).astype(np.float16))
    np.save(qdir / f"{queries[0].qid}.npy", np.full((2, K, CQ), np.inf, np.float32))
    with pytest.raises(StoreError, match=rf"{qdir / str(queries[0].qid)}\.npy: 16 value\(s\) not finite"):
        import_npy(
            dataset="charades",
            video_dir=vdir,
            query_dir=qdir,
            out=out,
            backbone="tiny-vit",
            frame_size=224,
            progress=False,
        )
