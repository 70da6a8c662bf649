"""Feature store: round trips, plain-zarr readability, manifest checks, atomic and concurrent writes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

import shards.store as store_mod
from shards.errors import StoreError
from shards.rawarray import RawArray, write_raw_array
from shards.schema import Query
from shards.store import FeatureStore, create_store, open_store

K, P, C, CQ = 2, 3, 8, 4
GEOMETRY = (K, P, C, CQ)


def tokens(seed: int, t: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((t, K, P, C)).astype(np.float16)


def qtokens(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(1000 + seed).standard_normal((length, K, CQ)).astype(np.float16)


@pytest.fixture
def store(tmp_path, tiny_manifest) -> FeatureStore:
    return create_store(tmp_path / "s.zarr", tiny_manifest(GEOMETRY))


def test_video_roundtrip_and_metadata(store):
    store.write_video("b", tokens(1, 7), 1.0)
    store.write_video("a", tokens(0, 5), 1.0)
    assert store.video_ids() == ["a", "b"]
    assert store.has_video("a") and not store.has_video("c")
    np.testing.assert_array_equal(store.read_video("a"), tokens(0, 5))
    assert store.video_length("b") == 7 and store.video_fps("b") == 1.0 and store.video_duration("b") == 7.0
    out = np.full((7, K, P, C), 9, np.float16)
    assert store.read_video("b", out=out) is out
    np.testing.assert_array_equal(out, tokens(1, 7))
    with pytest.raises(ValueError, match="shape"):
        store.read_video("b", out=np.empty((6, K, P, C), np.float16))
    with pytest.raises(StoreError, match="'c' is not in store"):
        store.read_video("c")
    reopened = open_store(store.path)
    assert reopened.manifest == store.manifest
    np.testing.assert_array_equal(reopened.read_video("b"), tokens(1, 7))


def test_reads_into_rows_of_a_padded_buffer_equal_plain_reads(store, monkeypatch):
    monkeypatch.setattr(store_mod, "QUERY_CHUNK_BYTES", 2 * K * CQ * 2)  # 2 tokens per chunk
    store.write_video("a", tokens(0, 5), 1.0)
    store.write_video("b", tokens(1, 3), 1.0)
    store.write_queries([1, 2], [qtokens(0, 3), qtokens(1, 4)])
    video = np.full((2, 6, K, P, C), 7, np.float16)
    for row, vid in enumerate(["a", "b"]):
        t = store.video_length(vid)
        assert store.read_video(vid, out=video[row, :t]).base is video
        np.testing.assert_array_equal(video[row, :t], store.read_video(vid))
        assert (video[row, t:] == 7).all()  # the padding is left alone
    query = np.full((2, 5, K, CQ), 7, np.float16)
    for row, qid in enumerate([1, 2]):
        n = store.query_length(qid)
        store.read_query(qid, out=query[row, :n])  # query 2 starts mid-chunk and spans two chunks
        np.testing.assert_array_equal(query[row, :n], store.read_query(qid))
        assert (query[row, n:] == 7).all()
    with pytest.raises(ValueError, match=r"shape \(3, 2, 4\)"):
        store.read_query(1, out=query[0, :4])
    with pytest.raises(ValueError, match="C-contiguous"):
        store.read_video("b", out=np.empty((3, K, P, 2 * C), np.float16)[..., ::2])
    with pytest.raises(ValueError, match="writeable"):
        store.read_video("b", out=store.map_video("b"))


@pytest.mark.parametrize("verify", [True, False])
def test_reading_the_last_layers_equals_slicing_after(store, verify):
    store.write_video("a", tokens(0, 5), 1.0)
    fresh = open_store(store.path, verify_reads=verify)
    np.testing.assert_array_equal(fresh.read_video("a", layers=1), tokens(0, 5)[:, -1:])
    np.testing.assert_array_equal(fresh.read_video("a", layers=K), tokens(0, 5))
    rows = np.full((2, 6, 1, P, C), 7, np.float16)  # a padded batch of one layer
    assert fresh.read_video("a", out=rows[1, :5], layers=1).base is rows
    np.testing.assert_array_equal(rows[1, :5], tokens(0, 5)[:, -1:])
    assert (rows[1, 5] == 7).all() and (rows[0] == 7).all()
    with pytest.raises(ValueError, match=r"layers must be in 1\.\.2"):
        fresh.read_video("a", layers=K + 1)
    with pytest.raises(ValueError, match="shape"):
        fresh.read_video("a", out=np.empty((5, K, P, C), np.float16), layers=1)


def test_layer_slabs_of_multi_chunk_arrays_and_their_checks(tmp_path):
    data = np.random.default_rng(0).standard_normal((5, 3, P, C)).astype(np.float16)
    write_raw_array(tmp_path / "a", [data], (3, P, C), 2, {}, fsync=False)  # chunks of 2, 2 and 1 rows
    array = RawArray.load(tmp_path / "a")
    for first, count in ((0, 1), (1, 2), (2, 1)):
        for check in (None, "array 'a'"):
            out = array.read_slab(first, np.empty((5, count, P, C), np.float16), check)
            np.testing.assert_array_equal(out, data[:, first : first + count])
    with pytest.raises(ValueError, match="does not fit"):
        array.read_slab(2, np.empty((5, 2, P, C), np.float16))
    chunk = array.chunk_path(1)
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0xFF  # layer 0 of row 2: outside the slab of layer 2, inside its chunk's checksum
    chunk.write_bytes(bytes(raw))
    np.testing.assert_array_equal(array.read_slab(2, np.empty((5, 1, P, C), np.float16)), data[:, 2:])
    with pytest.raises(StoreError, match="corrupt"):
        RawArray.load(tmp_path / "a").read_slab(2, np.empty((5, 1, P, C), np.float16), "array 'a'")


def test_rewrite_replaces_video(store):
    store.write_video("a", tokens(0, 5), 1.0)
    store.write_video("a", tokens(3, 4), 1.0)
    np.testing.assert_array_equal(open_store(store.path).read_video("a"), tokens(3, 4))
    assert store.staging_entries() == []


def test_queries_multi_chunk_parts_and_replacement(store, monkeypatch):
    monkeypatch.setattr(store_mod, "QUERY_CHUNK_BYTES", 3 * K * CQ * 2)  # 3 tokens per chunk
    store.write_queries([5, "x", 7], [qtokens(0, 4), qtokens(1, 2), qtokens(2, 5)])
    store.write_queries([5, 9], [qtokens(3, 1), qtokens(4, 3)])
    assert store.query_ids() == [5, "x", 7, 9]
    np.testing.assert_array_equal(store.read_query(5), qtokens(3, 1))
    np.testing.assert_array_equal(store.read_query("x"), qtokens(1, 2))
    np.testing.assert_array_equal(store.read_query(7), qtokens(2, 5))  # spans chunks 2 and 3
    assert store.query_length(9) == 3 and not store.has_query("5")
    # a part whose every query was rewritten is deleted
    store.write_queries(["x", 7, 9], [qtokens(5, 1), qtokens(6, 1), qtokens(7, 1)])
    assert len(store.query_parts()) == 2
    with pytest.raises(StoreError, match="query 'nope' has no tokens"):
        store.read_query("nope")


def test_annotations_merge_by_qid(store):
    a = Query(vid="a", qid=1, text="one", duration=5.0, split="train", moments=[[1.0, 2.0]])
    b = Query(vid="b", qid="q2", text="two", duration=7.0, split="test")
    store.write_annotations([a, b])
    a2 = Query(vid="a", qid=1, text="one again", duration=5.0, split="train", moments=[[0.0, 1.0]])
    store.write_annotations([a2])
    assert open_store(store.path).annotations() == [a2, b]


def test_plain_zarr_reads_everything(store):
    store.write_video("a", tokens(0, 5), 1.0)
    store.write_queries([1, 2], [qtokens(0, 3), qtokens(1, 2)])
    store.write_annotations([Query(vid="a", qid=1, text="t", duration=5.0, split="train")])
    root = zarr.open_group(str(store.path), mode="r")
    assert root.attrs["backbone"] == "tiny-vit" and root.attrs["layers"] == K
    video = root["videos/a"]
    np.testing.assert_array_equal(video[:], tokens(0, 5))
    assert video.attrs["fps"] == 1.0 and video.attrs["num_clips"] == 5
    ((name, part),) = root["queries"].arrays()
    offsets = np.concatenate([[0], np.cumsum(part.attrs["lengths"])])
    assert part.attrs["qids"] == [1, 2]
    np.testing.assert_array_equal(part[offsets[1] : offsets[2]], qtokens(1, 2))
    assert root["annotations"].attrs["queries"][0]["vid"] == "a"


def test_reencoded_array_is_read_through_zarr(store):
    store.write_video("a", tokens(0, 5), 1.0)
    attrs = dict(zarr.open_array(str(store.path / "videos/a")).attrs)
    zarr.create_array(
        store=str(store.path / "videos/a"),
        shape=(5, K, P, C),
        chunks=(2, K, P, C),
        dtype="float16",
        attributes=attrs,
        overwrite=True,
    )[:] = tokens(0, 5)
    with pytest.raises(StoreError, match="video 'a' has no CRC-32 per chunk"):  # 1 checksum, 3 chunks
        open_store(store.path).read_video("a")
    fresh = open_store(store.path, verify_reads=False)
    assert not fresh.video_array("a").fast
    np.testing.assert_array_equal(fresh.read_video("a"), tokens(0, 5))


def test_write_validation(store, tmp_path):
    with pytest.raises(StoreError, match=r"shape \(5, 3, 3, 8\).*\(N, 2, 3, 8\)"):
        store.write_video("a", np.zeros((5, 3, P, C), np.float16), 1.0)
    with pytest.raises(StoreError, match="fps 2.0 differs from the store's fps 1.0"):
        store.write_video("a", tokens(0), 2.0)
    for bad in ("../evil", "zarr.json", ".hidden"):
        with pytest.raises(StoreError, match="cannot be a store key"):
            store.write_video(bad, tokens(0), 1.0)
    with pytest.raises(StoreError, match=r"shape \(3, 2, 5\)"):
        store.write_queries([1], [np.zeros((3, K, 5), np.float16)])
    with pytest.raises(StoreError, match="read-only"):
        open_store(store.path).write_video("a", tokens(0), 1.0)
    assert store.video_ids() == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("backbone", "ViT-B-16"),
        ("fps", 0.5),
        ("layers", 4),
        ("weights_sha256", "ff00"),
        ("format_version", 2),
    ],
)
def test_open_with_mismatching_expectation_names_both_values(store, field, value):
    stored = getattr(store.manifest, field)
    with pytest.raises(StoreError) as err:
        open_store(store.path, expect={field: value})
    assert field in str(err.value) and repr(stored) in str(err.value) and repr(value) in str(err.value)
    assert open_store(store.path, expect={field: stored}).manifest == store.manifest


def test_expecting_an_unknown_manifest_field_is_a_programming_error(store):
    with pytest.raises(ValueError, match=r"unknown manifest fields: \['colour'\]"):
        open_store(store.path, expect={"colour": "red", "layers": K})


def test_create_over_mismatching_store_is_refused(store, tiny_manifest):
    with pytest.raises(StoreError, match="backbone is 'tiny-vit' in the store but 'ViT-B-16' was expected"):
        create_store(store.path, tiny_manifest(GEOMETRY, backbone="ViT-B-16"))
    again = create_store(store.path, tiny_manifest(GEOMETRY))  # same identity, new creation time: resumes
    assert again.manifest.created == store.manifest.created


def test_other_format_version_is_refused(store):
    meta_file = store.path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["format_version"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="format version 99, this package reads version 1"):
        open_store(store.path)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no zarr.json"):
        open_store(tmp_path / "empty")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a feature store: its attributes hold no manifest"):
        open_store(tmp_path / "plain.zarr")
    zarr.create_array(store=str(tmp_path / "arr.zarr"), shape=(2,), dtype="f4")
    with pytest.raises(StoreError, match="not a feature store"):
        open_store(tmp_path / "arr.zarr")


def _crash_while_committing(path):
    """Child process: die (no cleanup) exactly when the video is about to be renamed into place."""
    s = open_store(path, mode="a")
    os.rename = lambda *a: os._exit(3)
    s.write_video("a", tokens(0, 5), 1.0)


def test_killed_write_never_counts_and_is_cleaned_on_rewrite(store):
    child = mp.get_context("fork").Process(target=_crash_while_committing, args=(store.path,))
    child.start()
    child.join(30)
    assert child.exitcode == 3
    fresh = open_store(store.path, mode="a")
    assert fresh.video_ids() == [] and not fresh.has_video("a")
    assert len(fresh.staging_entries()) == 1 and fresh.staging_entries()[0].startswith("video.a+")
    fresh.write_video("a", tokens(0, 5), 1.0)
    assert fresh.staging_entries() == []
    np.testing.assert_array_equal(fresh.read_video("a"), tokens(0, 5))


def _writer(path, manifest, first, count):
    s = create_store(path, manifest(GEOMETRY))
    for i in range(first, first + count):
        s.write_video(f"v{i}", tokens(i, 3 + i % 4), 1.0)


def test_concurrent_creators_and_writers_of_disjoint_videos(tmp_path, tiny_manifest):
    path = tmp_path / "shared.zarr"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, tiny_manifest, first, 6)) for first in (0, 6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    s = open_store(path)
    assert s.video_ids() == sorted(f"v{i}" for i in range(12))
    for i in range(12):
        np.testing.assert_array_equal(s.read_video(f"v{i}"), tokens(i, 3 + i % 4))
    assert s.staging_entries() == []
    assert not [p for p in tmp_path.iterdir() if p.name != "shared.zarr"]  # no temporary store left


def test_docs_plain_zarr_snippet_runs(store):
    """The plain-zarr snippet of docs/store.md reads a real store."""
    doc = (Path(__file__).parents[1] / "docs" / "store.md").read_text()
    code = doc.split("<!-- plain-zarr-snippet -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    store.write_video("a", tokens(0, 5), 1.0)
    store.write_queries([1, "b"], [qtokens(0, 3), qtokens(1, 2)])
    store.write_queries([1], [qtokens(2, 4)])
    store.write_annotations([Query(vid="a", qid=1, text="t", duration=5.0, split="train")])
    scope: dict = {}
    exec(code.replace("cache/qvhighlights/ViT-B-32_openai_k4.zarr", str(store.path)), scope)
    np.testing.assert_array_equal(scope["tokens"], tokens(0, 5))
    assert scope["manifest"]["layers"] == K and scope["fps"] == 1.0
    assert sorted(scope["query_tokens"], key=str) == [1, "b"]
    np.testing.assert_array_equal(scope["query_tokens"][1], qtokens(2, 4))
    np.testing.assert_array_equal(scope["query_tokens"]["b"], qtokens(1, 2))
    assert scope["annotations"][0]["qid"] == 1


def test_map_video_is_a_read_only_view_that_survives_a_rewrite(store):
    store.write_video("a", tokens(0, 5), 1.0)
    mapped = store.map_video("a")
    np.testing.assert_array_equal(mapped, tokens(0, 5))
    assert not mapped.flags.writeable
    store.write_video("a", tokens(1, 6), 1.0)
    np.testing.assert_array_equal(mapped, tokens(0, 5))  # the old file lives on while mapped
    np.testing.assert_array_equal(store.map_video("a"), tokens(1, 6))
    (store.path / "videos/a/c.0.0.0.0").write_bytes(b"short")
    with pytest.raises(StoreError, match="is truncated"):
        open_store(store.path).map_video("a")
    with pytest.raises(StoreError, match="is truncated"):
        open_store(store.path).read_video("a")
