"""Feature store under concurrent writers: real processes hammering one store lose nothing."""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import shards.staging as staging_mod
from shards.errors import StoreError
from shards.manifest import Manifest
from shards.schema import Query
from shards.staging import Staging
from shards.store import STAGING, create_store, open_store
from shards.verify import verify_store
from tests.helpers.fixtures import make_tiny_manifest

K, P, C, CQ = 2, 3, 8, 4
GEOMETRY = (K, P, C, CQ)
WRITERS, ROUNDS = 4, 30
STORES = 8
"""Stores created by two racing creators in :func:`test_racing_creators_keep_both_splits`."""


def manifest() -> Manifest:
    """The manifest of every store here (built in each child: fixtures do not reach spawned processes)."""
    return make_tiny_manifest((K, P, C, CQ))


def video(writer: int, i: int) -> np.ndarray:
    rng = np.random.default_rng(10_000 * writer + i)
    return rng.standard_normal((2 + i % 3, K, P, C)).astype(np.float16)


def qtok(writer: int, i: int, version: int) -> np.ndarray:
    rng = np.random.default_rng([writer, i, version])
    return rng.standard_normal((1 + i % 4, K, CQ)).astype(np.float16)


def query(writer: int, i: int, version: int) -> Query:
    return Query(
        vid=f"w{writer}-v{i}",
        qid=f"w{writer}-q{i}",
        text=f"writer {writer} query {i} version {version}",
        duration=float(2 + i % 3),
        split="train",
    )


def _hammer(path: Path, writer: int, start) -> None:
    """Child: ``ROUNDS`` rounds of a video, a query part and an annotation write; every third round
    also rewrites the query and annotation of round ``i - 2`` (version 1), so parts get superseded,
    and writes the video ``shared`` that every writer writes."""
    store = open_store(path, mode="a", fsync=False)
    start.wait(60)
    for i in range(ROUNDS):
        store.write_video(f"w{writer}-v{i}", video(writer, i), 1.0)
        ids, tokens, records = [f"w{writer}-q{i}"], [qtok(writer, i, 0)], [query(writer, i, 0)]
        if i % 3 == 2:
            store.write_video("shared", video(writer, i), 1.0)
            ids.append(f"w{writer}-q{i - 2}")
            tokens.append(qtok(writer, i - 2, 1))
            records.append(query(writer, i - 2, 1))
        store.write_queries(ids, tokens)
        store.write_annotations(records)


def _run(target, args_per_child: list[tuple], ctx) -> list[int | None]:
    procs = [ctx.Process(target=target, args=args) for args in args_per_child]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return [p.exitcode for p in procs]


def test_hammering_writers_lose_no_video_query_or_annotation(tmp_path):
    path = tmp_path / "s.zarr"
    create_store(path, manifest(), fsync=False)
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_hammer, args=(path, w, start)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * WRITERS

    store = open_store(path)
    version = {i: 1 if i + 2 < ROUNDS and (i + 2) % 3 == 2 else 0 for i in range(ROUNDS)}
    expected = {
        query(w, i, version[i]).qid: (w, i, version[i]) for w in range(WRITERS) for i in range(ROUNDS)
    }
    assert sorted(map(str, store.query_ids())) == sorted(expected)
    for qid, (w, i, v) in expected.items():
        np.testing.assert_array_equal(store.read_query(qid), qtok(w, i, v), err_msg=qid)
    stored = {q.qid: q for q in store.annotations()}
    assert stored == {qid: query(w, i, v) for qid, (w, i, v) in expected.items()}
    assert len(store.video_ids()) == WRITERS * ROUNDS + 1
    last = ROUNDS - 1  # the last commit of "shared" was the last round of one of the writers
    assert any(np.array_equal(store.read_video("shared"), video(w, last)) for w in range(WRITERS))
    for w in range(WRITERS):
        for i in range(ROUNDS):
            np.testing.assert_array_equal(store.read_video(f"w{w}-v{i}"), video(w, i))
    # the parts of the 4 x 10 rewritten queries were superseded and collected; the others are live
    assert len(store.query_parts()) == WRITERS * (ROUNDS - ROUNDS // 3)
    assert store.staging_entries() == []
    report = verify_store(path)
    assert report.ok, report.problems


def _create_and_annotate(root: Path, split: str, barrier) -> None:
    """Child: like ``r2 extract`` of one split, ``STORES`` times: create the store (racing the
    other child), write its videos and query tokens, then its annotations (racing again)."""
    for n in range(STORES):
        barrier.wait(60)
        store = create_store(root / f"s{n}.zarr", manifest(), fsync=False)
        records = [
            Query(vid=f"{split}-v{j}", qid=f"{split}-{j}", text=f"{split} {j}", duration=2.0, split=split)
            for j in range(3)
        ]
        for q in records:
            store.write_video(q.vid, video(0, 0), 1.0)
        store.write_queries([q.qid for q in records], [qtok(0, j, 0) for j in range(3)])
        barrier.wait(60)  # both extractions finish their tokens together
        store.write_annotations(records)


def test_racing_creators_keep_both_splits(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    codes = _run(_create_and_annotate, [(tmp_path, "train", barrier), (tmp_path, "test", barrier)], ctx)
    assert codes == [0, 0]
    for n in range(STORES):
        store = open_store(tmp_path / f"s{n}.zarr")
        splits = sorted(q.split for q in store.annotations())
        assert splits == ["test"] * 3 + ["train"] * 3, f"store {n}: {splits}"
        assert len(store.query_ids()) == 6 and len(store.video_ids()) == 6
        assert verify_store(store.path).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"s{n}.zarr" for n in range(STORES)]


def _stage_and_wait(staging: Path, ready, release) -> None:
    """Child: hold a live staging entry of label ``queries`` until told to go."""
    with Staging(staging, fsync=False).stage("queries") as tmp:
        (tmp / "data").write_bytes(b"in progress")
        ready.set()
        release.wait(60)
        assert (tmp / "data").read_bytes() == b"in progress"


def test_staging_keeps_entries_of_live_writers_and_removes_dead_ones(tmp_path):
    store = create_store(tmp_path / "s.zarr", manifest(), fsync=False)
    staging = store.path / STAGING
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_stage_and_wait, args=(staging, ready, release))
    child.start()
    assert ready.wait(60)
    (live,) = store.staging_entries()  # the child's, named <label>+<host>-<pid space>-<pid>-<random>
    assert f"-{child.pid}-" in live
    dead = staging / live.replace(f"-{child.pid}-", f"-{_dead_pid()}-")  # same host and pid space
    dead.mkdir()
    other_host = staging / "queries+elsewhere-0123456789ab-1-00000000"
    other_host.mkdir()
    store.write_queries([1], [qtok(0, 0, 0)])  # stages "queries" next to the live entry
    release.set()
    child.join(60)
    assert child.exitcode == 0  # the live writer's entry was left alone
    assert not dead.exists()  # the dead local writer's entry was removed
    assert other_host.exists()  # a writer on another host is not provably dead while recent
    old = time.time() - 2 * 86400
    os.utime(other_host, (old, old))
    store.write_queries([2], [qtok(0, 1, 0)])
    assert not other_host.exists()  # ... until it is older than the grace period
    assert store.staging_entries() == []


def test_reader_with_a_cached_index_follows_a_collected_part(tmp_path):
    writer = create_store(tmp_path / "s.zarr", manifest(), fsync=False)
    writer.write_queries([1, 2], [qtok(0, 1, 0), qtok(0, 2, 0)])
    reader = open_store(writer.path)  # another process's view: its index points into the first part
    np.testing.assert_array_equal(reader.read_query(1), qtok(0, 1, 0))
    writer.write_queries([1, 2], [qtok(0, 1, 1), qtok(0, 2, 1)])  # supersedes the first part
    assert len(writer.query_parts()) == 1
    np.testing.assert_array_equal(reader.read_query(2), qtok(0, 2, 1))


def test_annotation_writer_waits_for_the_lock_and_gives_up_with_one_line(tmp_path, monkeypatch):
    store = create_store(tmp_path / "s.zarr", manifest(), fsync=False)
    holder = os.open(store.path / STAGING / "zarr.json", os.O_RDWR)  # another writer's lock
    fcntl.flock(holder, fcntl.LOCK_EX)
    monkeypatch.setattr(staging_mod, "LOCK_TIMEOUT_S", 0.3)
    with pytest.raises(StoreError, match=r"s.zarr stayed locked by another writer for 0.3 s \(flock on"):
        store.write_annotations([query(0, 0, 0)])
    monkeypatch.setattr(staging_mod, "LOCK_TIMEOUT_S", 60.0)
    threading.Timer(0.5, os.close, [holder]).start()  # the other writer finishes
    started = time.monotonic()
    store.write_annotations([query(0, 0, 0)])
    assert time.monotonic() - started >= 0.4
    assert store.annotations() == [query(0, 0, 0)]


def _dead_pid() -> int:
    """A pid of this host that no process has (a child that has exited and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait(60)
    return child.pid
