"""Shared data pass: K models on one read of the data equal K separate ``train_run`` runs; grouping rules."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from shards.datasets import get_dataset
from tests.helpers.fixtures import synthetic_store_fixture
from tests.helpers.synthetic import SyntheticSpec
from train.checkpoint import read_checkpoint
from train.config import get_preset
from train.engine.memory import ACTIVATIONS, BATCH, STATE, estimate_step, store_extent
from train.engine.trainer import train_run
from train.sweep.config import request_config
from train.sweep.shared import data_key, group_requests, max_models, pass_bytes, run_shared_trials
from train.sweep.trials import TrialRequest, trial_hash

TINY = ["epochs=2", "batch_size=4", "model.dims=32", "model.heads=4", "model.layers=2", "warmup=2",
        "train.num_workers=0"]
TIMING = {"samples_per_s", "train_seconds", "val_samples_per_s"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# held out as `test`, the split the tacos preset validates on
store = synthetic_store_fixture(
    SyntheticSpec(n_videos=6, n_heldout=2, clips=16, dataset="tacos", heldout_split="test")
)


def _request(index: int, root: Path, store: str, extra: list[str]) -> TrialRequest:
    overrides = dict(item.split("=", 1) for item in TINY + extra)
    name = f"t{index}-{trial_hash('tacos', overrides)}"
    return TrialRequest(index, name, str(root / name), "tacos", store, overrides, {}, device="cpu")


def _log(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_shared_pass_equals_separate_runs_with_the_same_seeds(store, tmp_path):
    extras = [["lr=1e-3", "model.dropout=0.5"], ["lr=3e-3", "model.dropout=0.2", "loss_sal=0.5"]]
    requests = [_request(i, tmp_path / "shared", store, extra) for i, extra in enumerate(extras)]
    records = run_shared_trials(requests)
    assert [(r.status, r.shared) for r in records] == [("ok", 2), ("ok", 2)], [r.error for r in records]

    for request, record in zip(requests, records, strict=True):
        alone = tmp_path / "separate" / request.name
        result = train_run(request_config(request), store, alone, device="cpu", progress=False)
        shared = Path(request.trial_dir)
        assert record.metrics == {**result.best_metrics, "best_epoch": result.best_epoch, "epochs": 2}
        assert _log(shared) == _log(alone)
        assert json.loads((shared / "best.json").read_text()) == json.loads((alone / "best.json").read_text())
        for name in ("last.pt", "best.pt"):
            a, b = read_checkpoint(shared / name), read_checkpoint(alone / name)
            assert a.state_dict.keys() == b.state_dict.keys()
            assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict), name
        rngs = [read_checkpoint(run / "last.pt").meta["rng"]["torch"] for run in (shared, alone)]
        assert torch.equal(*rngs)
    first, second = (read_checkpoint(Path(r.trial_dir) / "last.pt").state_dict for r in requests)
    assert not all(torch.equal(first[k], second[k]) for k in first)   # the two trials really differ


def test_grouping_follows_the_data_settings_and_the_slots(store, tmp_path):
    lrs = ["1e-3", "2e-3", "3e-3", "4e-3"]
    same = [_request(i, tmp_path, store, [f"lr={lr}"]) for i, lr in enumerate(lrs)]
    other_batch = _request(4, tmp_path, store, ["batch_size=2"])
    loader_workers = _request(5, tmp_path, store, ["lr=5e-3", "train.num_workers=1"])
    pending = [*same, other_batch, loader_workers]
    assert data_key(request_config(same[0])) == data_key(request_config(same[3]))
    assert data_key(request_config(same[0])) != data_key(request_config(other_batch))

    def indices(tasks):
        return [[r.index for r in task] for task in tasks]

    assert indices(group_requests(pending, slots=1, mode="auto")) == [[0, 1, 2, 3], [4], [5]]
    assert indices(group_requests(pending, slots=2, mode="auto")) == [[0, 1], [2, 3], [4], [5]]
    assert indices(group_requests(pending, slots=4, mode="auto")) == [[0], [1], [2], [3], [4], [5]]
    assert indices(group_requests(pending, slots=4, mode="on")) == [[0, 1, 2, 3], [4], [5]]
    assert indices(group_requests(pending, slots=1, mode="off")) == [[i] for i in range(6)]
    Path(same[1].trial_dir).mkdir(parents=True)
    (Path(same[1].trial_dir) / "last.pt").write_bytes(b"")          # an interrupted trial resumes alone
    assert indices(group_requests(pending, slots=1, mode="on")) == [[0, 2, 3], [1], [4], [5]]


def test_memory_bound_limits_the_models_per_pass(store):
    """One batch, one model's activations (the models step in turn) and K models' weights + AdamW."""
    from shards.store import open_store

    cfg = request_config(_request(0, Path("/unused"), store, []))
    step = estimate_step(cfg, *store_extent(open_store(store)), device_type="cpu")
    state = step.bytes_of(STATE)
    assert state >= 16 * 30_000          # at least the weights + optimizer state of the tiny model
    assert pass_bytes(step, 1) == step.total
    assert pass_bytes(step, 3) == step.bytes_of(BATCH) + step.bytes_of(ACTIVATIONS) + 3 * state
    for budget in (pass_bytes(step, 10), pass_bytes(step, 10) + state - 1):
        assert max_models(step, budget) == 10
    assert max_models(step, pass_bytes(step, 10) + state) == 11
    assert max_models(step, step.total // 2) == 1


def test_a_typical_shared_pass_holds_many_more_models_than_the_old_model():
    """QVHighlights on ViT-B/32 (batch 128, T = 75, L = 32) on a GPU with 48 GB for the pass: the old
    model charged every model its own float32 batch with the TEF and 6 activations of (B, T, P, D) per
    layer, so two models fit; activations are one model's at a time."""
    cfg = get_preset("qvhighlights")
    budget = 48 * 10**9
    step = estimate_step(cfg, 75, 32, device_type="cuda")
    b, t, k, (p, c, _), d = 128, 75, cfg.model.layers, cfg.model.token_dims(), cfg.model.dims
    old_model = 16 * (step.bytes_of(STATE) // 18) + 4 * b * t * k * p * (c + 2 + 6 * d)
    old_fit = max(1, (budget - 4 * b * t * k * p * c) // old_model)
    assert old_fit == 2
    assert max_models(step, budget) > 50 * old_fit
    assert pass_bytes(step, max_models(step, budget)) <= budget


def test_cli_sweep_on_the_real_trainer_with_a_shared_pass(store, tmp_path):
    from r2.cli import build_app

    app = build_app()
    out = tmp_path / "sweep"
    fixed = [a for item in TINY if item != "epochs=2" for a in ("--set", item)]
    args = ["sweep", "--preset", "tacos", "--store", store, "--out", str(out), "--workers", "0",
            "--shared-pass", "on", "--grid", "lr=1e-3,3e-3", "--set", "epochs=1", *fixed]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "shared x2" in result.output
    assert "r2 train --preset tacos --store" in result.output and "--set lr=" in result.output
    assert "--arch synthetic-tiny" in result.output
    command = next(line for line in result.output.splitlines() if line.strip().startswith("r2 train "))
    best_run = CliRunner().invoke(app, shlex.split(command)[1:])   # the printed command runs as is
    assert best_run.exit_code == 0, best_run.output
    assert json.loads((out / "best" / "config.json").read_text())["model"]["video_width"] == 16
    saved = json.loads((out / "results.json").read_text())
    key = get_dataset("tacos").key_metric
    assert saved["key_metric"] == key and key in saved["trials"][0]["metrics"]
    assert [t["status"] for t in saved["trials"]] == ["ok", "ok"]
    assert (out / "sweep.png").is_file() and (out / "results.csv").is_file()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.output.count("reused") >= 2
