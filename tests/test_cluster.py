"""External dask clusters (``--scheduler``): no worker, relative paths, invisible files, Ctrl-C, threads.

Each test addresses a real ``LocalCluster`` by its scheduler address, as ``r2 extract`` / ``r2 sweep``
address a cluster started elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from distributed import Client, LocalCluster
from typer.testing import CliRunner

from extract.config import ExtractConfig
from r2.cli import build_app
from shards.cluster import ClusterError, check_visible
from shards.store import open_store
from tests.helpers.fixtures import synthetic_store_fixture
from tests.helpers.synthetic import SyntheticSpec
from train.checkpoint import read_checkpoint
from train.sweep.results import best_command
from train.sweep.runner import plan_sweep, run_sweep
from train.sweep.spec import build_spec
from train.sweep.trials import DONE_FILE, TrialRequest

store = synthetic_store_fixture(
    SyntheticSpec(n_videos=6, n_heldout=2, clips=16, dataset="tacos", heldout_split="test")
)
_QUIET = dict(host="127.0.0.1", dashboard_address=None, silence_logs=logging.ERROR,
              scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"})
TINY = ["batch_size=4", "model.dims=32", "model.heads=4", "model.layers=2", "warmup=0", "epochs=1"]


@pytest.fixture
def no_workers() -> Iterator[str]:
    """The address of a scheduler that has no worker."""
    with LocalCluster(n_workers=0, processes=False, protocol="tcp", **_QUIET) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The address of a scheduler with one worker process (started in the repository's folder)."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, **_QUIET) as local:
        yield local.scheduler_address


def _videos(folder: Path, write_charades) -> Path:
    from tests.helpers.videos import make_video

    folder.mkdir()
    make_video(folder / "a.mp4", frames=20, rate=10)  # 2 frames at 1 fps
    return write_charades(folder.parent / "charades_test.jsonl", [(0, "a", "a red square")], 2.0)


def test_extract_without_workers_says_what_it_waits_for_and_gives_up(tmp_path, write_charades, no_workers,
                                                                     caplog):
    annotations = _videos(tmp_path / "videos", write_charades)
    args = ["extract", "--dataset", "charades", "--videos", str(tmp_path / "videos"), "--annotations",
            str(annotations), "--out", str(tmp_path / "s.zarr"), "--pretrained", "random", "--device", "cpu",
            "--scheduler", no_workers, "--worker-timeout", "1", "--no-progress"]
    started = time.monotonic()
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 2, result.output
    assert f"error: no dask worker joined the scheduler at {no_workers} within 1 s" in result.output
    assert time.monotonic() - started < 15
    assert f"waiting up to 1 s for a dask worker to join the scheduler at {no_workers}" in caplog.text


def test_sweep_without_workers_gives_up(store, tmp_path, no_workers, caplog):
    def sweep(timeout: str):
        args = ["sweep", "--preset", "tacos", "--store", str(store), "--out", str(tmp_path / "sweep"),
                "--grid", "lr=1e-3", "--scheduler", no_workers, "--worker-timeout", timeout]
        return CliRunner().invoke(build_app(), [*args, *[a for item in TINY for a in ("--set", item)]])

    result = sweep("0.5")
    assert isinstance(result.exception, ClusterError), result.output
    message = str(result.exception)
    assert message.startswith(f"no dask worker joined the scheduler at {no_workers} within 0.5 s")
    assert "waiting up to 0.5 s for a dask worker" in caplog.text
    result = sweep("0")
    assert isinstance(result.exception, ClusterError), result.output
    assert "--worker-timeout must be a positive number of seconds, got 0" in str(result.exception)


def test_relative_extract_paths_reach_the_workers_absolute(tmp_path, write_charades, cluster, monkeypatch):
    from extract.job import run_extraction

    _videos(tmp_path / "videos", write_charades)
    monkeypatch.chdir(tmp_path)              # the worker process stays in the folder it started in
    cfg = ExtractConfig(dataset="charades", videos=Path("videos"), annotations=[Path("charades_test.jsonl")],
                        out=Path("s.zarr"), pretrained="random", device="cpu", scheduler=cluster,
                        batch_size=4, workers=1, progress=False)
    summary = run_extraction(cfg)
    assert summary.failures == {} and (summary.extracted, summary.frames) == (1, 2)
    assert summary.store == tmp_path / "s.zarr"
    assert open_store(tmp_path / "s.zarr").video_ids() == ["a"]


def _seen_store(request: TrialRequest) -> dict[str, float]:
    if not Path(request.store).is_dir():
        raise FileNotFoundError(f"the worker does not see {request.store}")
    return {"score": 1.0}


def test_relative_sweep_paths_reach_the_workers_absolute(tmp_path, cluster, monkeypatch):
    (tmp_path / "store.zarr").mkdir()
    monkeypatch.chdir(tmp_path)
    plan = plan_sweep(build_spec(preset="tacos", store="store.zarr", grid=["lr=1,2"]), "sweep",
                      key_metric="score")
    result = run_sweep(plan, trial_fn=_seen_store, scheduler=cluster)
    assert result.counts()["ok"] == 2, [r.error for r in result.records]
    assert plan.store == str(tmp_path / "store.zarr")


def test_a_worker_that_cannot_see_the_store_stops_the_sweep_with_one_line(tmp_path, cluster):
    with Client(cluster) as client:
        with pytest.raises(ClusterError, match=r"^worker tcp://\S+ cannot see /nowhere/store.zarr: share the "
                                               "folder with the workers or run with a path they see$"):
            check_visible(client, [tmp_path, "/nowhere/store.zarr"])
        check_visible(client, [tmp_path])
    (tmp_path / "store.zarr").mkdir()
    plan = plan_sweep(build_spec(preset="tacos", store=str(tmp_path / "store.zarr"), grid=["lr=1"]),
                      tmp_path / "sweep", key_metric="score")
    shutil.rmtree(tmp_path / "store.zarr")   # seen when planned, not by the worker
    with pytest.raises(ClusterError, match=f"cannot see {tmp_path / 'store.zarr'}: share the folder"):
        run_sweep(plan, trial_fn=lambda request: {"score": 1.0}, scheduler=cluster)
    assert not list((tmp_path / "sweep").glob("trial-*"))


_INTERRUPTED = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from train.sweep.runner import plan_sweep, run_sweep
    from train.sweep.spec import build_spec

    # as in a terminal, even when the test runs as a background job (which inherits SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def trial(request):
        ticks = Path(request.trial_dir) / "ticks"
        for _ in range(1200):
            with ticks.open("a") as f:
                f.write(".")
            time.sleep(0.05)
        return {"score": 1.0}

    if __name__ == "__main__":
        spec = build_spec(preset="charades", store=sys.argv[1], grid=["lr=1,2,3"])
        run_sweep(plan_sweep(spec, sys.argv[2], key_metric="score"), trial_fn=trial, scheduler=sys.argv[3])
    """
)


def test_ctrl_c_cancels_the_trials_on_an_external_cluster(tmp_path, cluster):
    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPTED)
    (tmp_path / "store.zarr").mkdir()
    out = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "store.zarr"), str(out), cluster],
                            stderr=subprocess.PIPE, start_new_session=True, cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 60
    while not list(out.glob("trial-*/ticks")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)          # Ctrl-C in a terminal: the sweep's process group
    assert proc.wait(timeout=60) != 0
    assert "KeyboardInterrupt" in proc.stderr.read().decode()
    (ticks,) = out.glob("trial-*/ticks")
    with Client(cluster) as client:
        deadline = time.monotonic() + 10
        while any(client.processing().values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(client.processing().values())          # nothing runs or waits on the cluster
        before = ticks.stat().st_size
        time.sleep(1.0)
        assert ticks.stat().st_size == before                # the interrupted trial stopped writing
        assert client.submit(sum, [1, 2]).result(timeout=10) == 3     # and its worker lives on
    saved = json.loads((out / "results.json").read_text())
    assert saved["counts"]["pending"] == 3 and not list(out.glob(f"*/{DONE_FILE}"))


def test_the_best_command_reproduces_a_one_thread_trial_of_an_external_cluster(store, tmp_path, cluster):
    spec = build_spec(preset="tacos", store=str(store), grid=["lr=1e-3"], fixed=TINY)
    result = run_sweep(plan_sweep(spec, tmp_path / "sweep", device="cpu"), scheduler=cluster)
    (record,) = result.records
    assert record.status == "ok", record.error
    assert record.threads == 1                                    # 1 thread per trial on an external cluster
    trial = tmp_path / "sweep" / record.name
    assert json.loads((trial / DONE_FILE).read_text())["threads"] == 1
    command = best_command(result)
    assert command is not None and "--threads 1" in command

    threads = torch.get_num_threads()
    torch.set_num_threads(2)                                      # not the trial's count
    try:
        again = CliRunner().invoke(build_app(), [*shlex.split(command)[1:], "--device", "cpu"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert again.exit_code == 0, again.output
    a, b = (read_checkpoint(run / "best.pt").state_dict for run in (trial, tmp_path / "sweep" / "best"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
