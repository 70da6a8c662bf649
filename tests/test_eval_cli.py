"""``r2 eval``: table, official JSON keys, --out, errors (exit 2), mounted in the r2 command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from eval.postprocess import postprocess_for
from eval.predictions import QueryPrediction, write_predictions
from r2.cli import build_app

DATA = Path(__file__).parent / "data" / "eval"
runner = CliRunner()


def r2_eval(args: list[str]):
    """Run ``r2 eval ARGS``."""
    return runner.invoke(build_app(), ["eval", *args])


def _charades(tmp_path: Path) -> tuple[Path, Path]:
    ann = tmp_path / "charades_test.jsonl"
    ann.write_text(
        '{"qid": 1, "query": "a", "duration": 30.0, "vid": "AAAAA", "relevant_windows": [[0, 10]]}\n'
        '{"qid": 2, "query": "b", "duration": 30.0, "vid": "AAAAA", "relevant_windows": [[10, 20]]}\n'
    )
    preds = tmp_path / "preds.jsonl"
    # Q1 top-1 [0,8]: IoU .8; Q2 top-1 [0,5]: IoU 0 -> R1@0.5 = 50, mIoU = 40
    preds.write_text(
        '{"qid": 1, "pred_relevant_windows": [[0, 8, 0.9]]}\n'
        '{"qid": 2, "pred_relevant_windows": [[0, 5, 0.9]]}\n'
    )
    return preds, ann


def test_table_for_people(tmp_path):
    preds, ann = _charades(tmp_path)
    result = r2_eval(["--dataset", "charades", "--predictions", str(preds), "--annotations", str(ann)]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "Charades-STA: preds.jsonl vs charades_test.jsonl"
    header = next(line for line in lines if line.startswith("bucket")).split()
    full = next(line for line in lines if line.startswith("full")).split()
    row = dict(zip(header[1:], full[1:], strict=True))
    assert row["R1@0.5"] == "50.00" and row["R1@0.7"] == "50.00" and row["mIoU"] == "40.00"
    assert any(line.startswith("short") for line in lines)
    assert not any(line.startswith("long") for line in lines)  # no GT window longer than 30 s


def test_json_and_out_give_official_keys(tmp_path):
    out = tmp_path / "m" / "metrics.json"
    args = [
        "-d",
        "qvh",
        "-p",
        str(DATA / "moment_detr" / "sample_val_preds.jsonl"),
        "-a",
        str(DATA / "qvhighlights" / "highlight_val_release.jsonl"),
        "--json",
        "--out",
        str(out),
    ]
    result = r2_eval(args)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    golden = json.loads((DATA / "moment_detr" / "sample_val_preds_metrics_raw.json").read_text())
    for key, value in golden["brief"].items():
        assert printed["brief"][key] == value
    assert printed["brief"]["HL-min-VeryGood-mAP"] == 35.65
    assert json.loads(out.read_text()) == printed


def test_errors_exit_2(tmp_path):
    preds, ann = _charades(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"qid": 1, "pred_relevant_windows": [[0, 8, 0.9]]}\n{"qid": 2, oops}\n')
    result = r2_eval(["-d", "charades", "-p", str(bad), "-a", str(ann)])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {bad}:2: malformed JSON")

    result = r2_eval(["-d", "nosuch", "-p", str(preds), "-a", str(ann)])
    assert result.exit_code == 2 and "unknown dataset 'nosuch'" in result.output

    partial = tmp_path / "partial.jsonl"
    partial.write_text('{"qid": 1, "pred_relevant_windows": [[0, 8, 0.9]]}\n')
    result = r2_eval(["-d", "charades", "-p", str(partial), "-a", str(ann)])
    assert result.exit_code == 2 and "1 annotated queries have no prediction (e.g. 2)" in result.output
    result = r2_eval(["-d", "charades", "-p", str(partial), "-a", str(ann), "--allow-missing", "--json"]
    )
    assert result.exit_code == 0 and json.loads(result.output)["brief"]["MR-full-R1@0.5"] == 100.0


def test_mounted_as_r2_eval(tmp_path):
    preds, ann = _charades(tmp_path)
    parent = build_app()
    result = runner.invoke(
        parent, ["eval", "--dataset", "charades", "-p", str(preds), "-a", str(ann), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["brief"]["MR-full-mIoU"] == 40.0
    help_text = runner.invoke(parent, ["eval", "--help"]).output
    assert "--predictions" in help_text and "COMMAND" not in help_text


def test_postprocess_applies_the_dataset_postprocessing_to_raw_windows(tmp_path):
    _, ann = _charades(tmp_path)  # duration 30; GT q1 [0, 10], q2 [10, 20]
    raw = {
        1: [[0.0, 4.0, 0.95], [0.0, 4.5, 0.94], [-2.0, 10.04, 0.9]],  # NMS moves the last one up
        2: [[10.0, 31.0, 0.9]],  # clamped to [10, 30]: IoU 10/21 -> 1/2
    }
    raw_file, processed_file = tmp_path / "raw.jsonl", tmp_path / "processed.jsonl"
    write_predictions(raw_file, [QueryPrediction(q, windows=np.array(w)) for q, w in raw.items()])
    write_predictions(
        processed_file,
        [QueryPrediction(q, windows=postprocess_for("charades", np.array(w), 30.0)) for q, w in raw.items()],
    )

    def brief(path: Path, *flags: str) -> dict:
        result = r2_eval(["-d", "charades", "-p", str(path), "-a", str(ann), "--json", *flags])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["brief"]

    ours = brief(raw_file, "--postprocess")
    assert ours == brief(processed_file)
    # q1: [0, 10] (rounded) ranks 2nd after NMS, AP 1/2 at every IoU; q2: IoU 1/2, AP 1 at 0.5 only
    assert ours["MR-full-R1@0.5"] == 50.0 and ours["MR-full-mAP"] == 30.0
    as_given = brief(raw_file)  # q1: rank 3 at IoU 10/12.04, AP 1/3 at IoU 0.5 ... 0.8; q2: IoU 10/21, AP 0
    assert as_given["MR-full-R1@0.5"] == 0.0 and as_given["MR-full-mAP"] == 11.67  # (7/10 * 1/3 + 0) / 2
