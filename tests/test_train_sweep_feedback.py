"""Feedback of a running sweep (a line per finished trial with the counts and an ETA, the bar, reused
trials), its default folder, and SIGTERM on ``r2 sweep`` handled like Ctrl-C (exit 143 / 130)."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

from shards.cliutil import duration_text
from shards.datasets import get_dataset
from tests.helpers.fixtures import synthetic_store_fixture
from tests.helpers.synthetic import SyntheticSpec
from train.sweep.progress import SweepProgress
from train.sweep.runner import plan_sweep, run_sweep
from train.sweep.spec import build_spec
from train.sweep.trials import DONE_FILE, TrialRecord, TrialRequest

KEY = "score"
PROGRESS_LOGGER = "train.sweep.progress"

store = synthetic_store_fixture(
    SyntheticSpec(n_videos=4, n_heldout=2, clips=16, dataset="tacos", heldout_split="test")
)


class Clock:
    """A monotonic clock the test sets."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _request(index: int) -> TrialRequest:
    params = {"lr": str(index)}
    return TrialRequest(index, f"t{index}", f"/nowhere/t{index}", "charades", "s.zarr", params, params)


def _ok(index: int, seconds: float, score: float, shared: int = 1) -> TrialRecord:
    return TrialRecord(index, f"t{index}", {"lr": str(index)}, "ok", {KEY: score}, seconds, shared=shared)


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER]


def test_a_line_per_trial_with_the_counts_and_an_eta_from_the_mean_and_the_slots(caplog):
    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)
    clock = Clock()
    progress = SweepProgress(6, KEY, bar=False, clock=clock)
    progress.add_reused([TrialRecord(0, "t0", {"lr": "0"}, "ok", {KEY: 1.0}, 50.0, reused=True)])
    progress.start([[_request(i)] for i in range(1, 6)], slots=2)
    # before any trial of this run: the reused trials' mean, 50 s; 5 tasks on 2 slots take 3 rounds
    assert (progress.running(), progress.eta()) == (2, pytest.approx(150.0))

    clock.now = 100.0
    progress.finish(_ok(1, 100.0, 41.2))
    # mean 100 s: the slot of trial 2 (age 100) frees now, trial 3 just started; trials 4, 5 queue
    assert progress.eta() == pytest.approx(200.0)
    clock.now = 110.0
    progress.finish(TrialRecord(2, "t2", {"lr": "2"}, "failed", seconds=110.0,
                                error="ValueError: loss_sal must be a number, got 'bad'"))
    assert progress.eta() == pytest.approx(105.0 - 10.0 + 105.0)   # trial 3 (age 10), then trial 5
    for index, now in ((3, 200.0), (4, 290.0), (5, 300.0)):
        clock.now = now
        progress.finish(_ok(index, 90.0, float(index)))
    assert progress.eta() is None and progress.running() == 0
    assert _messages(caplog) == [
        "1 of 6 trials reused (finished in an earlier run)",
        "5 trials to run, 2 at a time",
        "trial 2/6 done (lr=1): score 41.2 in 100 s · ok 2 · running 2 · failed 0 · ETA 3 min",
        "trial 3/6 failed (lr=2): ValueError: loss_sal must be a number, got 'bad' in 110 s · ok 2 · "
        "running 2 · failed 1 · ETA 3 min",
        "trial 4/6 done (lr=3): score 3 in 90 s · ok 3 · running 2 · failed 1 · ETA 2 min",
        "trial 5/6 done (lr=4): score 4 in 90 s · ok 4 · running 1 · failed 1 · ETA 8 s",
        "trial 6/6 done (lr=5): score 5 in 90 s · ok 5 · running 0 · failed 1",
    ]


def test_a_shared_pass_holds_its_slot_until_its_last_trial_and_says_so(caplog):
    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)
    progress = SweepProgress(3, KEY, bar=False, clock=Clock())
    progress.start([[_request(0), _request(1)], [_request(2)]], slots=1)
    assert progress.running() == 2 and progress.eta() is None      # no duration known yet
    progress.finish(_ok(0, 30.0, 1.0, shared=2))
    assert progress.running() == 1
    progress.finish(_ok(1, 30.0, 2.0, shared=2))
    assert progress.running() == 1 and progress.eta() == pytest.approx(30.0)
    messages = _messages(caplog)
    assert messages[0] == "3 trials to run as 2 tasks (shared data passes), 1 at a time"
    assert messages[2].startswith("trial 2/3 done (lr=1): score 2 in 30 s (shared pass of 2) · ok 2 · "
                                  "running 1")


def test_the_bar_shows_the_same_counts():
    out = io.StringIO()
    progress = SweepProgress(3, KEY, bar=True, file=out, clock=Clock())
    with progress.shown():
        progress.add_reused([_ok(0, 20.0, 1.0)])
        progress.start([[_request(1)], [_request(2)]], slots=1)
        progress.finish(_ok(1, 10.0, 2.0))
    drawn = out.getvalue().split("\r")[-1]
    assert drawn.startswith("sweep 2/3 |")
    assert drawn.rstrip().endswith("ok 2 · running 1 · failed 0 · ETA 10 s")


@pytest.mark.parametrize("seconds, text", [(4.4, "4 s"), (89.0, "89 s"), (1260.0, "21 min"),
                                           (9000.0, "2.5 h")])
def test_durations_read_as_a_person_reads_an_estimate(seconds, text):
    assert duration_text(seconds) == text


def toy_trial(request: TrialRequest) -> dict[str, float]:
    if request.params["loss_sal"] == "bad":
        raise ValueError(f"loss_sal must be a number, got {request.params['loss_sal']!r}")
    return {KEY: -abs(math.log10(float(request.params["lr"])) + 4)}


def test_run_sweep_logs_every_trial_and_counts_reused_ones_as_done(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)
    (tmp_path / "store.zarr").mkdir()
    spec = build_spec(preset="charades", store=str(tmp_path / "store.zarr"),
                      grid=["lr=1e-3,1e-4", "loss_sal=0.1,bad"])
    run_sweep(plan_sweep(spec, tmp_path / "sweep", key_metric=KEY), trial_fn=toy_trial, workers=0)
    first = _messages(caplog)
    assert first[0] == "4 trials to run, 1 at a time"
    assert first[1].startswith("trial 1/4 done (lr=1e-3 loss_sal=0.1): score -1 in ")
    assert first[2].startswith("trial 2/4 failed (lr=1e-3 loss_sal=bad): ValueError: loss_sal must be a "
                               "number, got 'bad' in ")
    assert first[4].endswith(" · ok 2 · running 0 · failed 2")

    caplog.clear()
    run_sweep(plan_sweep(spec, tmp_path / "sweep", key_metric=KEY), trial_fn=toy_trial, workers=0)
    again = _messages(caplog)
    assert again[:2] == ["2 of 4 trials reused (finished in an earlier run)", "2 trials to run, 1 at a time"]
    assert again[2].startswith("trial 3/4 failed (lr=1e-3 loss_sal=bad)")
    assert " · ok 2 · running 1 · " in again[2]


def test_an_external_scheduler_reports_its_workers_as_slots(tmp_path, caplog):
    from distributed import LocalCluster

    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)
    (tmp_path / "store.zarr").mkdir()
    grid = ["lr=1e-3,1e-4,1e-5", "loss_sal=0.1"]
    spec = build_spec(preset="charades", store=str(tmp_path / "store.zarr"), grid=grid)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster:
        run_sweep(plan_sweep(spec, tmp_path / "sweep", key_metric=KEY), trial_fn=toy_trial,
                  scheduler=cluster.scheduler_address)
    lines = _messages(caplog)
    assert lines[0] == "3 trials to run, 2 at a time"
    assert [line.split()[1] for line in lines[1:]] == ["1/3", "2/3", "3/3"]
    assert lines[-1].endswith(" · ok 3 · running 0 · failed 0")


def test_the_default_sweep_folder_is_runs_preset_sweep(tmp_path, monkeypatch):
    (tmp_path / "store.zarr").mkdir()
    monkeypatch.chdir(tmp_path)
    plan = plan_sweep(build_spec(preset="charades", store="store.zarr", grid=["lr=1"]), key_metric=KEY)
    assert plan.out_dir == tmp_path / "runs" / "charades-sweep"


_SWEEP_COMMAND = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path

    import train.sweep.config
    from r2.cli import main

    # as in a terminal, even when the test runs as a background job (which inherits SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def trial(request):
        if request.index >= 1:
            (Path(request.trial_dir) / "started").write_text("1")
            time.sleep(60)
        return {sys.argv[1]: 1.0}

    train.sweep.config.train_trial = trial      # what `r2 sweep` trains with, in this process
    main(sys.argv[2:])
    """
)


@pytest.mark.parametrize("signum, status, said", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                  (signal.SIGINT, 130, "interrupted")])
def test_sigterm_stops_r2_sweep_like_ctrl_c_and_a_rerun_continues(store, tmp_path, monkeypatch, caplog,
                                                                  signum, status, said):
    script = tmp_path / "sweep_command.py"
    script.write_text(_SWEEP_COMMAND)
    out = tmp_path / "sweep"
    key = get_dataset("tacos").key_metric
    args = ["sweep", "--preset", "tacos", "--store", str(store), "--out", str(out), "--workers", "0",
            "--shared-pass", "off", "--device", "cpu", "--set", "model.layers=2",
            "--grid", "lr=1e-3,2e-3,3e-3"]
    proc = subprocess.Popen([sys.executable, str(script), key, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (list(out.glob(f"trial-000_*/{DONE_FILE}")) and list(out.glob("trial-001_*/started"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    os.kill(proc.pid, signum)               # what a batch scheduler does on pre-emption (or Ctrl-C)
    assert proc.wait(timeout=120) == status
    stderr = proc.stderr.read().decode()
    assert f"trial 1/3 done (lr=1e-3): {key} 1 in " in stderr            # the progress lines are shown
    assert f"{said}: 1 of 3 trials finished, results in {out}; re-run the same command to continue" in stderr
    assert "Traceback" not in stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(row["name"][:9], row["status"]) for row in rows] == [
        ("trial-000", "ok"), ("trial-001", "pending"), ("trial-002", "pending")]
    assert (out / "results.json").is_file()

    from r2.cli import build_app

    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)
    calls: list[int] = []

    def quick(request: TrialRequest) -> dict[str, float]:
        calls.append(request.index)
        return {key: 2.0}

    monkeypatch.setattr("train.sweep.config.train_trial", quick)
    again = CliRunner().invoke(build_app(), args)
    assert again.exit_code == 0, again.output
    assert calls == [1, 2]
    assert "1 of 3 trials reused (finished in an earlier run)" in _messages(caplog)
    assert [row["status"] for row in csv.DictReader((out / "results.csv").open())] == ["ok"] * 3
