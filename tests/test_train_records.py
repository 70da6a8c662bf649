"""Run-directory records: per-metric bests with their epochs (best.json, kept across resume) and the
per-epoch checkpoints of ``train.save_every_epoch``."""

from __future__ import annotations

import json
import math

import pytest
import torch

import train.engine.loop as loop_module
from tests.helpers.fixtures import synthetic_store_fixture
from tests.helpers.synthetic import SyntheticSpec, synthetic_run_config
from train.checkpoint import load_checkpoint
from train.config import RunConfig
from train.engine.evaluate import Validation
from train.engine.records import Best, improves
from train.engine.trainer import train_run

SPEC = SyntheticSpec(n_videos=6, n_heldout=2, clips=16, layers=2, max_len=5, seed=5)
OVERRIDES = ["model.dims=32", "model.heads=4", "batch_size=4", "train.num_workers=0", "warmup=2", "lr=1e-3"]
KEY = "MR-full-R1@0.5"
SCRIPT = {  # validation metrics of epochs 1..4: each metric peaks at another epoch
    1: {KEY: 10.0, "MR-full-mIoU": 30.0, "MR-full-mAP": 5.0},
    2: {KEY: 40.0, "MR-full-mIoU": 20.0, "MR-full-mAP": 6.0},
    3: {KEY: 30.0, "MR-full-mIoU": 25.0, "MR-full-mAP": 9.0},
    4: {KEY: 40.0, "MR-full-mIoU": 35.0, "MR-full-mAP": 1.0},
}
EXPECTED = {  # ties keep the earlier epoch (the key metric's 40 at epoch 2)
    KEY: {"value": 40.0, "epoch": 2},
    "MR-full-mIoU": {"value": 35.0, "epoch": 4},
    "MR-full-mAP": {"value": 9.0, "epoch": 3},
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


store = synthetic_store_fixture(SPEC)


def _cfg(epochs: int, *extra: str) -> RunConfig:
    return synthetic_run_config(SPEC, "tacos", [*OVERRIDES, f"epochs={epochs}", *extra])


@pytest.fixture
def scripted(monkeypatch) -> list[int]:
    """Validation metrics of the N-th validation are ``SCRIPT[N]`` (the real predictions are kept); returns
    the list of calls."""
    real = loop_module.score_predictions
    calls: list[int] = []

    def fake(*args, **kwargs) -> Validation:
        v = real(*args, **kwargs)
        calls.append(1)
        return Validation(dict(SCRIPT[len(calls)]), v.predictions, v.queries, v.seconds)

    monkeypatch.setattr(loop_module, "score_predictions", fake)
    return calls


def test_best_ranks_each_metric_on_its_own():
    best = Best(KEY)
    improved = [best.update(SCRIPT[epoch], epoch) for epoch in (1, 2, 3, 4)]
    assert improved == [True, True, False, False]
    assert (best.value, best.epoch, best.metrics) == (40.0, 2, SCRIPT[2])
    assert best.per_metric == EXPECTED
    summary = best.summary("test")
    assert (summary["epoch"], summary["key_metric"], summary["split"]) == (2, KEY, "test")
    assert summary["per_metric"] == EXPECTED


def test_improves_is_higher_is_better_and_nan_never_wins():
    assert improves(1.0, None) and improves(2.0, 1.0)
    assert not improves(1.0, 1.0) and not improves(0.5, 1.0)
    assert not improves(math.nan, None) and not improves(math.nan, 1.0)


def test_best_meta_round_trip_and_meta_of_older_checkpoints():
    best = Best(KEY)
    for epoch in (1, 2, 3):
        best.update(SCRIPT[epoch], epoch)
    back = Best(KEY)
    back.load_meta(best.to_meta())
    assert back == best
    old = {k: v for k, v in best.to_meta().items() if k != "per_metric"}  # a last.pt from before
    older = Best(KEY)
    older.load_meta(old)
    assert (older.value, older.epoch, older.per_metric) == (40.0, 2, {})


def test_best_json_tracks_every_metric_across_epochs(store, tmp_path, scripted):
    result = train_run(_cfg(4), store, tmp_path / "run", progress=False)
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["per_metric"] == EXPECTED
    assert (best["epoch"], best["value"], best["metrics"], best["split"]) == (2, 40.0, SCRIPT[2], "val")
    assert (result.best_epoch, result.best_value) == (2, 40.0)
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["meta"]["epoch"] == 2  # key metric


def test_per_metric_bests_survive_resume(store, tmp_path, scripted):
    run = tmp_path / "run"
    train_run(_cfg(2), store, run, progress=False)  # epochs 1, 2
    per_metric = json.loads((run / "best.json").read_text())["per_metric"]
    assert per_metric["MR-full-mIoU"] == {"value": 30.0, "epoch": 1}
    train_run(_cfg(4), store, run, resume=True, progress=False)  # epochs 3, 4 in a new Best
    assert len(scripted) == 4
    assert json.loads((run / "best.json").read_text())["per_metric"] == EXPECTED


def test_resume_of_a_last_pt_without_per_metric_bests(store, tmp_path, scripted):
    run = tmp_path / "run"
    train_run(_cfg(2), store, run, progress=False)
    payload = torch.load(run / "last.pt", weights_only=True)
    del payload["meta"]["best"]["per_metric"]  # as written before per-metric bests existed
    torch.save(payload, run / "last.pt")
    result = train_run(_cfg(4), store, run, resume=True, progress=False)
    best = json.loads((run / "best.json").read_text())
    assert (result.best_epoch, best["epoch"]) == (2, 2)  # the key-metric best is kept
    assert best["per_metric"]["MR-full-mAP"] == {"value": 9.0, "epoch": 3}  # bests of epochs 3-4 only
    assert best["per_metric"]["MR-full-mIoU"] == {"value": 35.0, "epoch": 4}


def test_save_every_epoch_writes_one_checkpoint_per_epoch(store, tmp_path):
    run = tmp_path / "run"
    train_run(_cfg(2, "train.save_every_epoch=true", "train.val_every=2"), store, run, progress=False)
    assert sorted(p.name for p in run.glob("epoch_*.pt")) == ["epoch_001.pt", "epoch_002.pt"]
    first, second = (torch.load(run / f"epoch_00{n}.pt", weights_only=True) for n in (1, 2))
    assert (first["meta"]["epoch"], second["meta"]["epoch"]) == (1, 2)
    assert first["meta"]["store"] == second["meta"]["store"]
    assert first["meta"]["store"]["weights_sha256"] == "synthetic-5"
    assert "metrics" not in first["meta"] and KEY in second["meta"]["metrics"]  # validated after epoch 2 only
    last = torch.load(run / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(second["state_dict"][k], last[k]) for k in last)
    assert any(not torch.equal(first["state_dict"][k], last[k]) for k in last)
    _, cfg, ckpt = load_checkpoint(run / "epoch_001.pt")
    assert cfg.train.save_every_epoch and cfg.model.dims == 32 and ckpt.meta["epoch"] == 1


def test_no_epoch_checkpoints_by_default(store, tmp_path):
    train_run(_cfg(1), store, tmp_path / "run", progress=False)
    assert not list((tmp_path / "run").glob("epoch_*.pt"))
