"""``r2 eval --checkpoint``: a checkpoint scored on a store split reproduces training's validation;
submission files; queries without tokens; refusals and option errors."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eval.predictions import read_predictions
from r2.cli import build_app
from shards.errors import ConfigError, StoreError
from shards.schema import Query
from tests.helpers.fixtures import synthetic_store_fixture
from tests.helpers.synthetic import SyntheticSpec, make_synthetic_store, synthetic_run_config
from train.checkpoint import save_checkpoint
from train.engine.evaluate import flat_metrics
from train.engine.runlog import read_metrics
from train.engine.score import score_checkpoint
from train.engine.trainer import train_run
from train.model import R2Tuning

SPEC = SyntheticSpec(n_videos=8, n_heldout=3, clips=16, layers=2, max_len=5, seed=3)
OVERRIDES = ["model.dims=32", "model.heads=4", "batch_size=4", "train.num_workers=0", "warmup=3", "lr=1e-3"]
SUBMISSION_KEYS = ["qid", "query", "vid", "pred_relevant_windows", "pred_saliency_scores"]
NO_TOKENS = [  # annotated 'val' queries the store has no tokens for: a video never extracted, a query
    Query(vid="vid09999", qid=900, text="concept 1", duration=32.0, split="val", moments=[[2.0, 6.0]]),
    Query(vid="vid00006", qid=901, text="concept 2", duration=32.0, split="val", moments=[[4.0, 8.0]]),
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


def r2_eval(*args: str | Path):
    return runner.invoke(build_app(), ["eval", *map(str, args)])


store = synthetic_store_fixture(SPEC)


@pytest.fixture(scope="module")
def gappy_store(tmp_path_factory) -> Path:
    """The same store (same identity, same tokens) with two annotated 'val' queries without tokens."""
    path = tmp_path_factory.mktemp("stores") / "gappy.zarr"
    make_synthetic_store(path, SPEC).write_annotations(NO_TOKENS)
    return path


@pytest.fixture(scope="module")
def run(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "x"
    train_run(synthetic_run_config(SPEC, "tacos", [*OVERRIDES, "epochs=2"]), store, out, progress=False)
    return out


def test_best_checkpoint_reproduces_best_json_exactly(run, store):
    result = r2_eval("--checkpoint", run / "best.pt", "--store", store, "--split", "val", "--json",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    best = json.loads((run / "best.json").read_text())
    assert best["split"] == "val"
    assert flat_metrics(json.loads(result.stdout)) == best["metrics"]
    out = run / "best_val_preds.jsonl"
    assert f"wrote 6 predictions of split 'val' to {out}" in result.stderr
    # the same records, in the same order, as the validation of the best epoch wrote during training
    assert out.read_text() == (run / "val_preds.jsonl").read_text()
    preds = read_predictions(out)
    assert [p.qid for p in preds] == list(range(10, 16))
    assert all(list(json.loads(line)) == SUBMISSION_KEYS for line in out.read_text().splitlines())
    assert preds[0].vid == "vid00005" and preds[0].query is not None and preds[0].query.startswith("concept ")


def test_table_and_out_path(run, store, tmp_path):
    out = tmp_path / "p.jsonl"
    result = r2_eval("-c", run / "last.pt", "--store", store, "--split", "val", "--out", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"TACoS: {run / 'last.pt'} on split 'val' of {store}"
    assert any(line.startswith("full") for line in lines)
    assert lines[-1] == f"wrote 6 predictions of split 'val' to {out}"
    assert len(read_predictions(out)) == 6
    for clobber in (run / "last.pt", store / "preds.jsonl"):
        result = r2_eval("-c", run / "last.pt", "--store", store, "--split", "val", "--out", clobber)
        assert result.exit_code == 2 and "would overwrite an input" in result.stderr


def test_qvhighlights_test_split_gives_a_submission_file(tmp_path):
    spec = replace(SPEC, dataset="qvhighlights", heldout_split="test")
    store = make_synthetic_store(tmp_path / "qvh.zarr", spec)
    store.write_annotations([replace(q, moments=[]) for q in store.annotations() if q.split == "test"])
    cfg = synthetic_run_config(spec, "qvhighlights", OVERRIDES)
    ckpt = save_checkpoint(tmp_path / "run" / "best.pt", R2Tuning(cfg.model, cfg.loss), cfg,
                           {"store": store.manifest.identity()})
    result = r2_eval("-c", ckpt, "--store", tmp_path / "qvh.zarr", "--split", "test")
    assert result.exit_code == 0, result.output
    out = tmp_path / "run" / "best_test_preds.jsonl"
    assert "split 'test' has no ground truth: nothing scored (the file is a submission)" in result.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["qid"] for r in records] == list(range(10, 16))
    for r in records:
        assert list(r) == SUBMISSION_KEYS
        assert r["query"].startswith("concept ") and r["vid"].startswith("vid")
        assert len(r["pred_saliency_scores"]) == spec.clips  # one per 2-s clip
        assert all(0 <= s <= e <= 32 for s, e, _ in r["pred_relevant_windows"])  # clamped to the video
    assert len(read_predictions(out)) == 6


def test_queries_without_tokens_fail_unless_allowed(run, gappy_store):
    args = ["-c", run / "best.pt", "--store", gappy_store, "--split", "val", "--json"]
    result = r2_eval(*args)
    assert result.exit_code == 2
    assert (f"error: 2 of the 8 annotated 'val' queries of store {gappy_store} cannot be predicted "
            "(1 without video tokens, 1 without query tokens; qids 900, 901)") in result.stderr
    assert "--allow-missing" in result.stderr and "train.allow_missing=true" in result.stderr

    result = r2_eval(*args, "--allow-missing")
    assert result.exit_code == 0, result.output
    assert "(2 annotated queries without tokens left out, --allow-missing)" in result.stderr
    best = json.loads((run / "best.json").read_text())
    assert flat_metrics(json.loads(result.stdout)) == best["metrics"]  # the other 6 are the same


def test_training_validation_counts_missing_queries(gappy_store, tmp_path, caplog):
    cfg = synthetic_run_config(SPEC, "tacos", [*OVERRIDES, "epochs=1"])
    with pytest.raises(StoreError, match=r"2 of the 8 annotated 'val' queries .* cannot be predicted"):
        train_run(cfg, gappy_store, tmp_path / "strict", progress=False)
    assert not (tmp_path / "strict").exists()
    allowed = synthetic_run_config(SPEC, "tacos", [*OVERRIDES, "epochs=1", "train.allow_missing=true"])
    with caplog.at_level(logging.WARNING, logger="train.engine.evaluate"):
        train_run(allowed, gappy_store, tmp_path / "lenient", progress=False)
    assert "scoring the other 6 (missing queries allowed)" in caplog.text
    record = read_metrics(tmp_path / "lenient" / "metrics.jsonl")[0]
    assert record["val_missing"] == 2 and "MR-full-R1@0.5" in record["val"]


def test_checkpoint_of_another_store_is_refused(run, tmp_path):
    other = tmp_path / "other.zarr"
    make_synthetic_store(other, replace(SPEC, seed=4))
    result = r2_eval("-c", run / "best.pt", "--store", other, "--split", "val")
    assert result.exit_code == 2
    assert f"checkpoint {run / 'best.pt'} was trained on another store" in result.stderr
    assert "weights_sha256 is 'synthetic-4' in the store but 'synthetic-3'" in result.stderr


def test_unknown_split_and_missing_store_are_clear_errors(run, store, tmp_path):
    with pytest.raises(ConfigError, match=r"no 'test' queries \(its splits: train, val\); pass one of them"):
        score_checkpoint(run / "best.pt", store, "test", device="cpu")
    result = r2_eval("-c", run / "best.pt", "--store", tmp_path / "nope.zarr", "--split", "val")
    assert result.exit_code == 2 and result.stderr.startswith("error: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "got neither"),
        (["-c", "best.pt", "-d", "tacos"], "got --dataset with --checkpoint"),
        (["-c", "c.pt", "--store", "s", "--postprocess"], "got --postprocess with --checkpoint, --store"),
        (["-c", "best.pt"], "checkpoint mode also needs --store, --split"),
        (["-d", "tacos", "-p", "p.jsonl", "--device", "cpu"], "got --dataset, --predictions with --device"),
        (["-d", "tacos", "-a", "a.jsonl"], "file mode also needs --predictions"),
    ],
)
def test_mixed_or_incomplete_options_are_one_clear_error(args, message):
    result = r2_eval(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith(
        "error: r2 eval scores a prediction file (needs --dataset, --predictions, --annotations; optional "
        "--postprocess) or a checkpoint on a store split (needs --checkpoint, --store, --split; optional "
        "--device); "
    )
    assert message in result.stderr
