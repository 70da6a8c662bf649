"""What a training run tells and leaves behind: the epoch lines (console and ``train.log``), TensorBoard
scalars (resume included, a shared pass's per model, a failing writer), a clean stop on SIGTERM / Ctrl-C,
the warning of a random-weights store, and the user errors that come before torch is imported."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import train.engine.runlog as runlog_module
from r2.cli import build_app
from shards.cliutil import duration_text
from tests.helpers.fixtures import make_tiny_manifest, synthetic_store_fixture
from tests.helpers.synthetic import SyntheticSpec, synthetic_run_config
from train.cli import warn_random_features
from train.config import RunConfig
from train.engine.records import Best, epoch_line
from train.engine.runlog import prepare_run_dir, read_metrics
from train.engine.trainer import train_run

ROOT = Path(__file__).resolve().parent.parent
# 4 training videos x 2 queries, batch 4: 2 optimizer steps per epoch; held out as `val`
SPEC = SyntheticSpec(n_videos=6, n_heldout=2, clips=16, layers=2, max_len=5, seed=11)
STEPS = 2
TINY = ["model.dims=32", "model.heads=4", "batch_size=4", "train.num_workers=0", "warmup=2", "lr=1e-3",
        "train.log_every=1"]
KEY = "MR-full-R1@0.5"

pytestmark = pytest.mark.usefixtures("one_torch_thread")

store = synthetic_store_fixture(SPEC)


def _cfg(epochs: int, *extra: str) -> RunConfig:
    return synthetic_run_config(SPEC, "tacos", [*TINY, f"epochs={epochs}", *extra])


def _cli_args(store: Path, out: Path, epochs: int) -> list[str]:
    """``r2 train`` arguments for the tiny run of :func:`_cfg` (the store fills the token dims)."""
    args = ["train", "--preset", "tacos", "--arch", SPEC.backbone, "--store", str(store), "--out", str(out),
            "--device", "cpu", "--threads", "1"]
    for item in [f"model.layers={SPEC.layers}", "train.val_split=val", *TINY, f"epochs={epochs}"]:
        args += ["--set", item]
    return args


def _log_lines(run: Path) -> list[str]:
    """``train.log`` without the time stamps."""
    lines = (run / "train.log").read_text(encoding="utf-8").splitlines()
    return [line.split("  ", 1)[1] for line in lines]


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard scalars of ``run`` as TensorBoard reads them: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# --- the epoch line ----------------------------------------------------------------------------------


def test_epoch_line_shows_losses_metric_best_time_and_eta():
    best = Best(KEY, value=42.0, epoch=2)
    record = {
        "epoch": 3, "train": {"loss": 1.23449, "loss_cls": 0.2, "loss_reg": 0.5}, "skipped_steps": 0,
        "val": {KEY: 41.2, "MR-full-mAP": 30.0},
    }
    assert epoch_line(record, best, 30, 62.4, 28 * 60) == (
        f"epoch 3/30  loss 1.234 (cls 0.2 reg 0.5)  {KEY} 41.20 (best 42.00 @ 2)  62 s  ETA 28 min"
    )
    unvalidated = {"epoch": 4, "train": {"loss": 1.0}, "skipped_steps": 3}
    assert epoch_line(unvalidated, best, 30, 5760, None) == (
        f"epoch 4/30  loss 1  3 steps skipped  {KEY} best 42.00 @ 2  1.6 h"
    )
    assert epoch_line(unvalidated, Best(KEY), 30, 1, 2) == "epoch 4/30  loss 1  3 steps skipped  1 s  ETA 2 s"
    texts = [duration_text(s) for s in (0.4, 89, 91, 5399, 5401)]
    assert texts == ["0 s", "89 s", "2 min", "90 min", "1.5 h"]


# --- train.log and TensorBoard -----------------------------------------------------------------------


def test_a_run_logs_each_epoch_to_the_console_train_log_and_tensorboard(store, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="train.engine.loop"):
        result = train_run(_cfg(2), store, run, progress=True)
    console = [r.getMessage() for r in caplog.records if r.name == "train.engine.loop"]
    epochs = [line for line in console if line.startswith("epoch ")]
    assert len(epochs) == 2 and "ETA" in epochs[0] and "ETA" not in epochs[1]
    assert f"{KEY} {result.history[1]['val'][KEY]:.2f} (best {result.best_value:.2f} @ {result.best_epoch})" \
        in epochs[1]
    assert console[0].startswith(f"training {run}: preset tacos") and f"{STEPS} steps" in console[0]
    assert console[1] == f"logs: {run / 'train.log'}, tensorboard --logdir {run / 'tensorboard'}"

    lines = _log_lines(run)
    assert lines[0].startswith("start: preset tacos") and "command: library call" in lines[0]
    assert lines[1:3] == epochs
    assert lines[3] == f"end: 2 epochs done ({lines[3].split('(', 1)[1].split(')')[0]}); best {KEY} " \
        f"{result.best_value:.2f} at epoch {result.best_epoch}"

    scalars = _scalars(run)
    history = read_metrics(run / "metrics.jsonl")
    ends = [r["iteration"] for r in history]
    assert ends == [STEPS, 2 * STEPS]
    for name in ("loss", "loss_cls", "loss_reg", "loss_sal", "lr"):
        assert [s for s, _ in scalars[f"train/{name}"]] == ends
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["train"]["loss"] for r in history])
    assert [v for _, v in scalars[f"val/{KEY}"]] == pytest.approx([r["val"][KEY] for r in history])
    assert [s for s, _ in scalars["step/loss"]] == list(range(1, 2 * STEPS + 1))  # log_every=1
    assert {"time/epoch_seconds", "time/samples_per_s", "step/grad_norm"} <= set(scalars)


def test_without_progress_the_console_stays_quiet_and_train_log_is_written(store, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="train.engine.loop"):
        train_run(_cfg(1), store, tmp_path / "run", progress=False)
    assert [r for r in caplog.records if r.name == "train.engine.loop"] == []
    assert [line.split(" ", 1)[0] for line in _log_lines(tmp_path / "run")] == ["start:", "epoch", "end:"]


def test_a_failing_tensorboard_writer_is_one_warning_and_the_run_goes_on(store, tmp_path, caplog,
                                                                          monkeypatch):
    class Broken:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def add_scalar(self, *args, **kwargs) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            pass

    monkeypatch.setattr(runlog_module, "_summary_writer", lambda: Broken)
    with caplog.at_level(logging.WARNING):
        result = train_run(_cfg(2), store, tmp_path / "run", progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert result.epochs == 2 and len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2
    assert len([w for w in warnings if "TensorBoard" in w]) == 1
    assert "No space left on device" in warnings[0] and "the run goes on" in warnings[0]


def test_without_the_tensorboard_package_one_warning_for_all_runs(store, tmp_path, caplog, monkeypatch):
    runlog_module._summary_writer.cache_clear()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    try:
        with caplog.at_level(logging.WARNING):
            train_run(_cfg(1), store, tmp_path / "a", progress=False)
            train_run(_cfg(1), store, tmp_path / "b", progress=False)
    finally:
        runlog_module._summary_writer.cache_clear()
    warnings = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(warnings) == 1 and "pip install tensorboard" in warnings[0]
    assert (tmp_path / "b" / "train.log").is_file() and not (tmp_path / "b" / "tensorboard").exists()


def test_a_resume_without_last_pt_starts_over_without_the_old_logs(tmp_path):
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"x")
    (run / "train.log").write_text("start: ...\n")
    (run / "config.json").write_text("{}")
    assert prepare_run_dir(run, resume=True)[1] is False
    assert list(run.iterdir()) == []


def test_a_shared_pass_writes_each_models_own_logs(store, tmp_path):
    from train.sweep.shared import run_shared_trials
    from train.sweep.trials import TrialRequest, trial_hash

    fixed = {"model.layers": str(SPEC.layers), "train.val_split": "val", "model.arch": SPEC.backbone}
    fixed |= dict(item.split("=", 1) for item in [*TINY, "epochs=2"])
    requests = []
    for i, lr in enumerate(("1e-3", "3e-3")):
        overrides = {**fixed, "lr": lr}
        name = f"t{i}-{trial_hash('tacos', overrides)}"
        requests.append(TrialRequest(i, name, str(tmp_path / name), "tacos", str(store), overrides, {},
                                     device="cpu"))
    records = run_shared_trials(requests)
    assert [r.status for r in records] == ["ok", "ok"], [r.error for r in records]
    for request, lr in zip(requests, (1e-3, 3e-3), strict=True):
        run = Path(request.trial_dir)
        lines = _log_lines(run)
        assert f"lr {lr:g}" in lines[0] and [line.split(" ", 1)[0] for line in lines[1:]] == [
            "epoch", "epoch", "end:"]
        history = read_metrics(run / "metrics.jsonl")
        scalars = _scalars(run)
        assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["train"]["loss"] for r in history])
        assert scalars["train/lr"][-1][1] == pytest.approx(lr)


# --- a clean stop ------------------------------------------------------------------------------------


def test_sigterm_stops_r2_train_cleanly_and_resume_finishes(store, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "r2", *_cli_args(store, run, 200)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not (run / "last.pt").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr

    info = json.loads((run / "run.json").read_text())
    stop = info["interrupted"]
    done = len(read_metrics(run / "metrics.jsonl"))
    assert stop["reason"] == "SIGTERM" and "ended_at" not in info
    assert 1 <= stop["epochs_done"] == done and stop["epoch"] == done + 1 and stop["step"] >= done * STEPS
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"terminated (SIGTERM) at epoch {done + 1}/200, step {stop['step']} ")
    assert last.endswith(" --resume") and "resume with: r2 train --preset tacos" in last
    assert _log_lines(run)[-1].startswith(f"stopped by SIGTERM at epoch {done + 1}/200")
    assert "Traceback" not in stderr

    epochs = done + 1
    resumed = CliRunner().invoke(build_app(), [*_cli_args(store, run, epochs), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, epochs + 1))
    info = json.loads((run / "run.json").read_text())
    assert "interrupted" not in info and "ended_at" in info and len(info["resumed_at"]) == 1
    lines = _log_lines(run)
    assert lines[-3].startswith(f"resume at epoch {epochs}/{epochs}: ") and lines[-1].startswith("end: ")
    # the steps the stopped process logged after its last saved epoch are dropped, then written again
    steps = [s for s, _ in _scalars(run)["step/loss"]]
    assert steps == list(range(1, epochs * STEPS + 1))


def test_ctrl_c_exits_130_with_the_resume_command(store, tmp_path, monkeypatch):
    import train.engine.trainer as trainer_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "train_run", interrupted)
    result = CliRunner().invoke(build_app(), _cli_args(store, tmp_path / "run", 2))
    assert result.exit_code == 130
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("interrupted before the first epoch; resume with: r2 train --preset tacos ")


# --- warnings and early errors -----------------------------------------------------------------------


def test_a_random_weights_store_gets_one_warning_naming_it(store, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(build_app(), _cli_args(store, tmp_path / "run", 1))
    assert result.exit_code == 0, result.output
    random = [r.getMessage() for r in caplog.records if "RANDOM CLIP weights" in r.getMessage()]
    assert len(random) == 1 and str(store) in random[0] and "mean nothing" in random[0]
    real = make_tiny_manifest((2, 2, 16, 16), pretrained="openai")
    assert not warn_random_features(real, store)


def test_user_errors_of_r2_train_come_before_torch_is_imported(tmp_path):
    code = (
        "import sys\n"
        "from r2.cli import main\n"
        f"store = {str(tmp_path / 'missing.zarr')!r}\n"
        "for args in (['--preset', 'nope'], ['--preset', 'tacos', '--set', 'lr=abc'],\n"
        "             ['--preset', 'tacos', '--set', 'nokey=1'], ['--preset', 'tacos']):\n"
        "    try:\n"
        "        main(['train', *args, '--store', store])\n"
        "    except SystemExit as exit:\n"
        "        print(exit.code, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.split("\n")[:4] == ["2 False"] * 4, done.stderr
    errors = done.stderr.strip().splitlines()
    assert errors[0].startswith("error: unknown preset 'nope'")
    assert errors[1] == "error: bad value 'abc' for lr: expected float"
    assert errors[2].startswith("error: unknown config key 'nokey'")
    assert errors[3].startswith(f"error: no feature store at {tmp_path / 'missing.zarr'}")
