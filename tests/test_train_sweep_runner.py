"""Sweep runner with a tiny injected trial function: failures, resume, results, threads, dask, Ctrl-C and
SIGTERM."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from train.sweep.results import best_command, format_table
from train.sweep.runner import SweepError, plan_sweep, run_sweep
from train.sweep.spec import build_spec
from train.sweep.trials import DONE_FILE, ERROR_FILE, TrialRequest

KEY = "score"


def toy_trial(request: TrialRequest) -> dict[str, float]:
    """Score peaks at lr=1e-4; loss_sal=bad raises; every call leaves a marker file."""
    calls = Path(request.trial_dir) / "calls.txt"
    calls.write_text(calls.read_text() + "x" if calls.exists() else "x")
    if request.params.get("loss_sal") == "bad":
        raise ValueError(f"loss_sal must be a number, got {request.params['loss_sal']!r}")
    lr, sal = float(request.params["lr"]), float(request.params.get("loss_sal", 0))
    return {KEY: -((math.log10(lr) + 4) ** 2) - sal, "other": lr * 1000, "pid": os.getpid()}


def _plan(tmp_path: Path, grid: list[str], **kwargs):
    store = tmp_path / "store.zarr"
    store.mkdir(exist_ok=True)
    spec = build_spec(preset="charades", store=str(store), grid=grid, **kwargs)
    return plan_sweep(spec, tmp_path / "sweep", key_metric=KEY)


def test_failing_trial_is_recorded_and_resume_skips_finished_trials(tmp_path):
    plan = _plan(tmp_path, ["lr=1e-3,1e-4,1e-5", "loss_sal=0.1,bad"], fixed=["epochs=2"])
    result = run_sweep(plan, trial_fn=toy_trial, workers=0)
    counts = result.counts()
    assert (counts["ok"], counts["failed"], counts["reused"]) == (3, 3, 0)
    ranked = result.ranked()
    assert ranked[0].params == {"lr": "1e-4", "loss_sal": "0.1"}
    assert [r.status for r in ranked] == ["ok"] * 3 + ["failed"] * 3
    assert "loss_sal must be a number" in ranked[-1].error
    failed_dir = Path(plan.requests[1].trial_dir)
    assert "ValueError" in (failed_dir / ERROR_FILE).read_text() and not (failed_dir / DONE_FILE).exists()
    ok_dir = Path(plan.requests[0].trial_dir)
    assert json.loads((ok_dir / DONE_FILE).read_text())["overrides"] == {"epochs": "2", "lr": "1e-3",
                                                                       "loss_sal": "0.1"}
    assert best_command(result).endswith("--set epochs=2 --set lr=1e-4 --set loss_sal=0.1")
    threads = torch.get_num_threads()      # recorded by the trials that ran in this process
    best = plan.out_dir / "best"
    assert best_command(result).startswith(
        f"r2 train --preset charades --store {plan.store} --out {best} --threads {threads} --set")
    table = format_table(result).splitlines()
    assert table[0].split()[:3] == ["rank", "trial", KEY] and table[1].split()[1] == "002"

    rows = list(csv.DictReader((plan.out_dir / "results.csv").open()))
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["failed"] * 3
    assert float(rows[0][KEY]) == pytest.approx(-0.1) and rows[0]["lr"] == "1e-4"
    saved = json.loads((plan.out_dir / "results.json").read_text())
    assert saved["best"]["params"] == {"lr": "1e-4", "loss_sal": "0.1"}
    assert (plan.out_dir / "sweep.png").stat().st_size > 5000

    again = run_sweep(_plan(tmp_path, ["lr=1e-3,1e-4,1e-5", "loss_sal=0.1,bad"], fixed=["epochs=2"]),
                      trial_fn=toy_trial, workers=0)
    assert again.counts()["reused"] == 3 and again.counts()["failed"] == 3
    assert (ok_dir / "calls.txt").read_text() == "x"          # finished: skipped
    assert (failed_dir / "calls.txt").read_text() == "xx"     # failed: retried

    extended = run_sweep(_plan(tmp_path, ["lr=1e-3,3e-4,1e-4,1e-5", "loss_sal=0.1"], fixed=["epochs=2"]),
                         trial_fn=toy_trial, workers=0)
    assert [r.reused for r in extended.records] == [True, False, True, True]
    assert extended.records[2].name == plan.requests[2].name   # found by hash despite the new index


def test_each_trial_records_its_torch_threads_and_the_best_command_repeats_them(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = run_sweep(_plan(tmp_path, ["lr=1e-4,1e-3"]), trial_fn=toy_trial, workers=0, threads=3)
    finally:
        torch.set_num_threads(threads)
    assert [r.threads for r in result.records] == [3, 3]
    done = Path(result.best().records[0].name)
    assert json.loads((result.plan.out_dir / done / DONE_FILE).read_text())["threads"] == 3
    assert " --threads 3 --set lr=1e-4" in best_command(result)

    for record in result.records:             # trials finished before the count was recorded
        path = result.plan.out_dir / record.name / DONE_FILE
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "threads"}))
    again = run_sweep(_plan(tmp_path, ["lr=1e-4,1e-3"]), trial_fn=toy_trial, workers=0)
    assert [r.threads for r in again.records] == [None, None] and "--threads" not in best_command(again)


def test_sweep_folder_of_another_store_is_refused(tmp_path):
    plan = _plan(tmp_path, ["lr=1e-4"])
    run_sweep(plan, trial_fn=toy_trial, workers=0)
    other = tmp_path / "other.zarr"
    other.mkdir()
    spec = build_spec(preset="charades", store=str(other), grid=["lr=1e-4"])
    with pytest.raises(SweepError, match="another --out"):
        run_sweep(plan_sweep(spec, plan.out_dir, key_metric=KEY), trial_fn=toy_trial, workers=0)
    with pytest.raises(SweepError, match="not found"):
        plan_sweep(build_spec(preset="charades", store=str(tmp_path / "nope"), grid=["lr=1"]), tmp_path / "x")


def test_local_cluster_with_two_workers_runs_every_trial(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="train.sweep.progress")
    plan = _plan(tmp_path, ["lr=1e-3,1e-4,1e-5", "loss_sal=0.1,bad"])
    seen = []
    result = run_sweep(plan, trial_fn=toy_trial, workers=2, on_record=seen.append)
    assert sorted(r.index for r in seen) == list(range(6))
    lines = [r.getMessage() for r in caplog.records if r.name == "train.sweep.progress"]
    assert lines[0] == "6 trials to run, 2 at a time"        # progress from the records the workers send
    assert [line.split()[1] for line in lines[1:]] == [f"{n}/6" for n in range(1, 7)]
    assert lines[-1].endswith(" · ok 3 · running 0 · failed 3")
    assert result.counts()["ok"] == 3 and result.counts()["failed"] == 3
    pids = {r.metrics["pid"] for r in result.records if r.status == "ok"}
    assert os.getpid() not in pids
    assert result.best().params == {"lr": "1e-4", "loss_sal": "0.1"}


_INTERRUPTED = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from shards.cliutil import sigterm_as_interrupt
    from train.sweep.runner import plan_sweep, run_sweep
    from train.sweep.spec import build_spec

    # as in a terminal, even when the test runs as a background job (which inherits SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def trial(request):
        if request.index >= 2:
            (Path(request.trial_dir) / "started").write_text("1")
            time.sleep(60)
        return {"score": float(request.index)}

    if __name__ == "__main__":
        spec = build_spec(preset="charades", store=sys.argv[1], grid=["lr=1,2,3,4"])
        with sigterm_as_interrupt():
            run_sweep(plan_sweep(spec, sys.argv[2], key_metric="score"), trial_fn=trial, workers=2)
    """
)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, "KeyboardInterrupt"),
                                            (signal.SIGTERM, "Terminated")])
def test_ctrl_c_or_sigterm_keeps_finished_trials_and_a_rerun_finishes_the_rest(tmp_path, signum, raised):
    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPTED)
    store, out = tmp_path / "store.zarr", tmp_path / "sweep"
    store.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(store), str(out)], stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (list(out.glob("trial-002_*/started")) and len(list(out.glob(f"*/{DONE_FILE}"))) == 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    os.killpg(proc.pid, signum)     # Ctrl-C in a terminal, or a batch scheduler: the whole process group
    assert proc.wait(timeout=120) != 0          # a generous deadline: a loaded CI machine is slow
    stderr = proc.stderr.read().decode()
    assert raised in stderr and stderr.count("Traceback") == 1   # workers stayed quiet
    deadline = time.monotonic() + 60
    while _group_alive(proc.pid) and time.monotonic() < deadline:        # dask workers are gone too
        time.sleep(0.1)
    assert not _group_alive(proc.pid)
    saved = json.loads((out / "results.json").read_text())
    assert saved["counts"]["ok"] == 2 and saved["counts"]["pending"] == 2
    assert [t["status"] for t in saved["trials"]] == ["ok", "ok", "pending", "pending"]
    interrupted = next(out.glob("trial-002_*"))
    assert not (interrupted / DONE_FILE).exists()

    calls = []

    def quick(request):
        calls.append(request.index)
        return {"score": float(request.index)}

    spec = build_spec(preset="charades", store=str(store), grid=["lr=1,2,3,4"])
    result = run_sweep(plan_sweep(spec, out, key_metric="score"), trial_fn=quick, workers=0)
    assert calls == [2, 3]
    assert [r.reused for r in result.records] == [True, True, False, False]
    assert result.best().index == 3
