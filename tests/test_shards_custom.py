"""The ``custom`` dataset: one's own annotation lines, with optional ids, durations and saliency."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.metrics import evaluate
from shards.annotation_files import annotation_file
from shards.annotations import custom_qid, load_many
from shards.errors import AnnotationError


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("mine.jsonl", ("mine.jsonl", None)),
        ("mine.jsonl:train", ("mine.jsonl", "train")),
        ("data/mine.jsonl:Validation", ("data/mine.jsonl", "val")),
        ("odd:name.jsonl", ("odd:name.jsonl", None)),
    ],
)
def test_annotation_file_takes_the_split_after_the_last_colon(arg, expected) -> None:
    path, split = annotation_file(arg)
    assert (str(path), split) == expected


def test_minimal_lines_get_stable_ids_and_probed_durations(tmp_path) -> None:
    records = [
        {"video": "kitchen.mp4", "query": "a man opens the fridge", "start": 3.0, "end": 7.5},
        {"vid": "garden", "query": "a dog runs", "relevant_windows": [[0, 4], [10, 12]]},
    ]
    path = _write(tmp_path / "mine.jsonl", records)
    probed: list[str] = []

    def durations(vid: str) -> float:
        probed.append(vid)
        return {"kitchen": 30.0, "garden": 20.0}[vid]

    queries = load_many("custom", [f"{path}:train"], durations=durations)
    assert probed == ["kitchen", "garden"]
    assert [q.vid for q in queries] == ["kitchen", "garden"]
    assert [q.split for q in queries] == ["train", "train"]
    assert [q.duration for q in queries] == [30.0, 20.0]
    assert queries[0].moments == [[3.0, 7.5]] and queries[1].moments == [[0.0, 4.0], [10.0, 12.0]]
    assert queries[0].qid == custom_qid("kitchen", "a man opens the fridge", [[3.0, 7.5]])
    reordered = _write(tmp_path / "mine_reordered.jsonl", records[::-1])
    again = load_many("custom", [f"{reordered}:train"], durations=durations)
    assert {q.qid for q in again} == {q.qid for q in queries}


def test_explicit_qid_and_duration_win(tmp_path) -> None:
    record = {"vid": "v", "qid": 7, "query": "x", "duration": 9, "start": 1, "end": 2}
    path = _write(tmp_path / "train.jsonl", [record])
    (query,) = load_many("custom", [path], durations=lambda vid: pytest.fail("probed a given duration"))
    assert (query.qid, query.duration, query.split) == (7, 9.0, "train")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"vid": "v", "query": "x", "start": 1}, "missing required field 'end'"),
        ({"vid": "v", "query": "x", "start": 1, "end": 2, "relevant_windows": [[1, 2]]}, "not both"),
        ({"vid": "v", "start": 1, "end": 2}, "missing required field 'query'"),
        ({"query": "x", "start": 1, "end": 2}, "missing required field 'vid'"),
        ({"vid": "v", "query": "x", "start": 5, "end": 2}, "end 2 < start 5"),
    ],
)
def test_bad_lines_name_the_field(tmp_path, record, message) -> None:
    path = _write(tmp_path / "train.jsonl", [record])
    with pytest.raises(AnnotationError, match=message):
        load_many("custom", [path], durations=lambda vid: 10.0)


def test_no_duration_and_nothing_to_probe_says_what_to_do(tmp_path) -> None:
    path = _write(tmp_path / "train.jsonl", [{"vid": "v", "query": "x", "start": 1, "end": 2}])
    with pytest.raises(AnnotationError, match="missing field 'duration'"):
        load_many("custom", [path])


def test_a_file_without_a_split_names_the_file_split_syntax(tmp_path) -> None:
    path = _write(tmp_path / "mine.jsonl", [{"vid": "v", "query": "x", "duration": 5}])
    with pytest.raises(AnnotationError, match=r"mine\.jsonl:train"):
        load_many("custom", [path])


def test_custom_scores_moments_and_adds_highlights_only_when_annotated(tmp_path) -> None:
    record = {"vid": "v", "qid": 1, "query": "x", "duration": 10, "start": 2, "end": 6}
    plain = _write(tmp_path / "test.jsonl", [record])
    (query,) = load_many("custom", [plain])
    prediction = {"qid": 1, "pred_relevant_windows": [[2.0, 6.0, 0.9]]}
    result = evaluate("custom", [prediction], [query])
    assert result["brief"]["MR-full-R1@0.7"] == 100.0
    assert not any(key.startswith("HL-") for key in result["brief"])
    rated = _write(tmp_path / "test_hl.jsonl", [{
        "vid": "v", "qid": 1, "query": "x", "duration": 10, "start": 2, "end": 6,
        "relevant_clip_ids": [1, 2], "saliency_scores": [[4, 4, 4], [2, 2, 2]],
    }])
    (query,) = load_many("custom", [f"{rated}:test"])
    prediction["pred_saliency_scores"] = [0.0, 1.0, 0.5, 0.0, 0.0]
    result = evaluate("custom", [prediction], [query])
    assert result["brief"]["HL-min-VeryGood-mAP"] == 100.0
