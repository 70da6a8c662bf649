"""Nothing silent: corrupt chunks fail every read, non-finite tokens are refused at write and reported
by verify, and a run whose losses stay non-finite stops with a clear error (issue 11, items 2-3)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import train.engine.loop as loop
from r2.cli import main
from shards.errors import StoreError
from shards.store import FeatureStore, open_store
from shards.verify import verify_store
from tests.helpers.synthetic import SyntheticSpec, make_synthetic_store, synthetic_run_config
from train.engine.loop import NONFINITE_STEPS, Member, NonFiniteLossError
from train.engine.rng import capture_rng
from train.engine.trainer import train_run
from train.sweep.shared import run_shared_trials
from train.sweep.trials import TrialRequest, trial_hash

SPEC = SyntheticSpec(n_videos=6, n_heldout=2, clips=12, layers=2, max_len=4, heldout_split="test", seed=5)
OVERRIDES = ["model.dims=32", "model.heads=4", "batch_size=4", "train.num_workers=0", "warmup=2", "lr=1e-3"]
"""Tiny runs: 4 training videos x 2 queries = 8 queries, 2 steps per epoch."""

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    return make_synthetic_store(tmp_path / "s.zarr", SPEC)


def flip_byte(path: Path, offset: int) -> None:
    """Flip the lowest bit of one byte: the value stays finite, only the checksum can tell."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def query_part(store: FeatureStore) -> Path:
    (part,) = [p for p in (store.path / "queries").iterdir() if p.is_dir()]
    return part


def cfg(epochs: int, *extra: str):
    return synthetic_run_config(SPEC, "tacos", [*OVERRIDES, f"epochs={epochs}", *extra])


# ----------------------------------------------------------------------------------- CRC on every read


def test_every_read_checks_the_crc_of_its_chunks(store):
    flip_byte(store.path / "videos/vid00001/c.0.0.0.0", 100)
    flip_byte(query_part(store) / "c.0.0.0", 7 * 64 + 3)  # a row of query 1 (6 rows of 64 bytes per query)
    fresh = open_store(store.path)
    reads = {
        "video 'vid00001'": lambda: fresh.read_video("vid00001"),
        "video 'vid00001' ": lambda: fresh.map_video("vid00001"),
        "video 'vid00001'  ": lambda: fresh.read_video("vid00001", out=np.empty((12, 2, 2, 16), np.float16)),
        "query 3": lambda: fresh.read_query(3),  # another query of the same (damaged) chunk
    }
    for what, read in reads.items():
        with pytest.raises(StoreError) as info:
            read()
        message = str(info.value)
        assert f"store {store.path}: the tokens of {what.strip()} are corrupt" in message
        assert "CRC-32" in message and f"r2 shards verify {store.path}" in message
    np.testing.assert_array_equal(fresh.read_video("vid00000"), store.read_video("vid00000"))
    unchecked = open_store(store.path, verify_reads=False)
    assert np.isfinite(unchecked.read_video("vid00001")).all() and unchecked.read_query(3).shape == (6, 2, 16)


@pytest.mark.parametrize("cache", ["ram", "off"])
def test_training_on_a_corrupt_chunk_fails_unless_the_check_is_turned_off(store, tmp_path, cache):
    flip_byte(store.path / "videos/vid00002/c.0.0.0.0", 40)
    with pytest.raises(StoreError, match=r"the tokens of video 'vid00002' are corrupt.*r2 shards verify"):
        train_run(cfg(1, f"train.cache={cache}"), store.path, tmp_path / "run", progress=False)
    unchecked = cfg(1, f"train.cache={cache}", "train.verify_reads=false")
    result = train_run(unchecked, store.path, tmp_path / "ok", progress=False)
    assert result.epochs == 1


# ------------------------------------------------------------------------------ non-finite at write


def test_non_finite_tokens_are_refused_at_write(store):
    video = np.zeros((4, 2, 2, 16), np.float32)
    video[2, 1, 0, 5] = np.nan
    with pytest.raises(StoreError, match=r"tokens of video 'new': 1 value\(s\) not finite .*\(2, 1, 0, 5\)"):
        store.write_video("new", video, 0.5)
    video[2, 1, 0, 5] = 1e5  # finite in float32, Inf in float16
    with pytest.raises(StoreError, match=r"tokens of video 'new': 1 value\(s\) beyond float16 range"):
        store.write_video("new", video, 0.5)
    good, bad = np.zeros((3, 2, 16), np.float16), np.full((3, 2, 16), -np.inf, np.float16)
    with pytest.raises(StoreError, match=r"tokens of query 'q2': 96 value\(s\) not finite"):
        store.write_queries(["q1", "q2"], [good, bad])
    assert not store.has_video("new") and not store.has_query("q1") and store.staging_entries() == []


# ------------------------------------------------------------------------- verify: non-finite tokens


def test_verify_reports_non_finite_tokens_written_before_the_check(store, monkeypatch):
    # a store written by a version without the check
    monkeypatch.setattr("shards.store.check_finite", lambda array, what: None, raising=False)
    video = store.read_video("vid00003").copy()
    video[[4, 9], 1] = np.inf
    store.write_video("vid00003", video, SPEC.fps)
    query = store.read_query(5).copy()
    query[0, 0, 0] = np.nan
    store.write_queries([5], [query])
    report = verify_store(store.path)
    found = sorted((p.kind, p.item) for p in report.problems)
    assert found == [("non-finite", "5"), ("non-finite", "vid00003")], report.problems
    assert "2 clip(s) hold NaN or Inf tokens (clips 4, 9)" in str(report.problems)
    assert verify_store(store.path, checksums=False).ok  # --quick reads no tokens


# ----------------------------------------------------------------------- non-finite losses stop a run


def nan_store(store: FeatureStore, monkeypatch: pytest.MonkeyPatch) -> FeatureStore:
    """Every video of ``store`` rewritten with one NaN per clip (bypassing the write check)."""
    monkeypatch.setattr("shards.store.check_finite", lambda array, what: None, raising=False)
    for vid in store.video_ids():
        tokens = store.read_video(vid).copy()
        tokens[:, 0, 0, 0] = np.nan
        store.write_video(vid, tokens, SPEC.fps)
    monkeypatch.undo()
    return store


def test_training_on_non_finite_tokens_stops_after_a_few_steps(store, tmp_path, monkeypatch):
    nan_store(store, monkeypatch)
    with pytest.raises(NonFiniteLossError) as info:
        train_run(cfg(10), store.path, tmp_path / "run", progress=False)
    message = str(info.value)
    assert f"{NONFINITE_STEPS} training steps in a row had a non-finite loss" in message
    assert f"iteration {NONFINITE_STEPS}," in message and "r2 shards verify" in message


def test_r2_train_exits_2_with_one_error_line(store, tmp_path, monkeypatch, capsys):
    nan_store(store, monkeypatch)
    fitted = cfg(10).to_dict()["model"]
    args = ["train", "--preset", "tacos", "--arch", SPEC.backbone, "--store", str(store.path)]
    args += ["--out", str(tmp_path / "run"), "--device", "cpu"]
    for key in ("video_tokens", "video_width", "text_width", "layers"):
        args += ["--set", f"model.{key}={fitted[key]}"]
    for item in [*OVERRIDES, "epochs=10"]:
        args += ["--set", item]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the progress bars
    assert last.startswith("error: run ") and "training steps in a row" in last and "Traceback" not in err


def fake_member(amp: bool) -> Member:
    state = SimpleNamespace(amp=amp, iteration=0, epoch=0, device="cpu")
    stats = SimpleNamespace(add=lambda out, size: None)
    return Member(state, SimpleNamespace(root=Path("run")), None, capture_rng(), stats)  # type: ignore[arg-type]


def test_only_consecutive_non_finite_steps_count(monkeypatch):
    outcomes: list[tuple[float, bool]] = []

    def fake_step(state, inputs):
        state.iteration += 1
        loss, skipped = outcomes.pop(0)
        return {"loss": loss, "grad_norm": math.inf if skipped else 1.0, "skipped": float(skipped), "lr": 0.1}

    monkeypatch.setattr(loop, "train_step", fake_step)
    nan, ok, scaler_skip = (math.nan, True), (1.0, False), (1.0, True)
    amp = fake_member(amp=True)
    outcomes += [scaler_skip] * 20 + [nan] * (NONFINITE_STEPS - 1) + [ok] + [nan] * (NONFINITE_STEPS - 1)
    for _ in range(len(outcomes)):
        amp.step(None, 1)
    outcomes.append(nan)
    with pytest.raises(NonFiniteLossError, match=f"{NONFINITE_STEPS} training steps in a row"):
        amp.step(None, 1)
    plain = fake_member(amp=False)  # without a GradScaler a skipped step means a non-finite gradient
    outcomes += [scaler_skip] * NONFINITE_STEPS
    with pytest.raises(NonFiniteLossError):
        for _ in range(NONFINITE_STEPS):
            plain.step(None, 1)
    assert plain.state.iteration == NONFINITE_STEPS


def test_a_sweep_records_the_non_finite_trial_as_failed(store, tmp_path, monkeypatch):
    real_step = loop.train_step

    def nan_for_high_lr(state, inputs):
        out = real_step(state, inputs)
        return {**out, "loss": math.nan} if state.cfg.optim.lr > 2e-3 else out

    monkeypatch.setattr(loop, "train_step", nan_for_high_lr)
    requests = []
    for index, lr in enumerate(("1e-3", "3e-3")):
        items = [*OVERRIDES, "epochs=3", f"lr={lr}", "model.layers=2"]
        overrides = dict(item.split("=", 1) for item in items)
        name = f"t{index}-{trial_hash('tacos', overrides)}"
        path = str(tmp_path / name)
        requests.append(TrialRequest(index, name, path, "tacos", str(store.path), overrides, {}, "cpu"))
    ok, failed = run_shared_trials(requests)
    assert ok.status == "ok" and failed.status == "failed"
    assert failed.error is not None and failed.error.startswith("NonFiniteLossError: run ")
    assert f"{NONFINITE_STEPS} training steps in a row" in failed.error
