"""Annotation parsers: real excerpts of every dataset, split inference, and every rejected input.

Expected values below were read from the source files listed in tests/data/annotations/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shards.annotation_files import infer_split
from shards.annotations import load_annotations, load_many
from shards.errors import AnnotationError, UnknownDatasetError

DATA = Path(__file__).parent / "data" / "annotations"


def by_qid(queries: list) -> dict:
    return {q.qid: q for q in queries}


def count_records(path: Path) -> int:
    return sum(1 for row in path.read_text().splitlines() if row.strip())


# --------------------------------------------------------------------------------------------
# Real excerpts


@pytest.mark.parametrize(
    ("dataset", "name", "split"),
    [
        ("qvhighlights", "qvhighlights_train_excerpt.jsonl", "train"),
        ("qvhighlights", "qvhighlights_val_excerpt.jsonl", "val"),
        ("qvhighlights", "qvhighlights_test_excerpt.jsonl", "test"),
        ("charades", "charades_train_excerpt.jsonl", "train"),
        ("charades", "charades_test_excerpt.jsonl", "test"),
        ("tacos", "tacos_train_excerpt.jsonl", "train"),
        ("tacos", "tacos_val_excerpt.jsonl", "val"),
        ("youtube", "youtube_highlight_val_excerpt.jsonl", "val"),
        ("tvsum", "tvsum_val_excerpt.jsonl", "val"),
    ],
)
def test_every_excerpt_parses_with_its_split(dataset: str, name: str, split: str) -> None:
    queries = load_annotations(dataset, DATA / name)
    assert len(queries) == count_records(DATA / name)
    assert {q.split for q in queries} == {split}
    for q in queries:
        assert q.duration > 0
        assert all(0.0 <= s <= e <= q.duration for s, e in q.moments)


def test_qvhighlights_val_record() -> None:
    q = by_qid(load_annotations("qvhighlights", DATA / "qvhighlights_val_excerpt.jsonl"))[2579]
    assert q.vid == "NUsG9BgSes0_210.0_360.0"
    assert q.text == "A girl and her mother cooked while talking with each other on facetime."
    assert q.duration == 150.0
    assert q.moments == [[82.0, 150.0]]
    assert q.saliency is not None
    assert q.saliency["clip_ids"] == list(range(41, 75))
    assert q.saliency["scores"][0] == [1, 1, 2]
    assert q.saliency["scores"][-1] == [3, 1, 4]
    assert (q.domain, q.fps) == (None, None)


def test_qvhighlights_train_record_with_several_windows() -> None:
    q = by_qid(load_annotations("qvh", DATA / "qvhighlights_train_excerpt.jsonl"))[10078]
    assert q.vid == "j7rJstUseKg_60.0_210.0"
    assert q.moments == [[48.0, 50.0], [76.0, 120.0], [122.0, 138.0], [140.0, 146.0]]
    assert len(q.saliency["clip_ids"]) == len(q.saliency["scores"]) == 34


def test_qvhighlights_test_without_ground_truth() -> None:
    queries = load_annotations("qvhighlights", DATA / "qvhighlights_test_excerpt.jsonl")
    q = by_qid(queries)[3158]
    assert q.text == "A video covering hill and water from a boat"
    assert q.vid == "_6hnl_BrFvs_360.0_510.0"
    assert all(x.moments == [] and x.saliency is None for x in queries)
    assert by_qid(queries)[9467].duration == 142.0


def test_charades_record() -> None:
    queries = load_annotations("charades-sta", DATA / "charades_test_excerpt.jsonl")
    q = by_qid(queries)[12404]
    assert (q.vid, q.text, q.duration) == ("3MSZA", "person turn a light on.", 30.96)
    assert q.moments == [[24.3, 30.4]]
    assert q.saliency is None


def test_tacos_record_keeps_string_qid_and_plain_vid() -> None:
    q = load_annotations("tacos", DATA / "tacos_val_excerpt.jsonl")[0]
    assert q.qid == "s34-d28_0"
    assert q.vid == "s34-d28"
    assert q.text == "The person gets out a knife."
    assert q.duration == pytest.approx(401.3605442176871)
    assert q.moments == [[pytest.approx(6.836734693877552), pytest.approx(16.564625850340136)]]


def test_youtube_record_and_per_video_fps() -> None:
    queries = load_annotations("youtube", DATA / "youtube_highlight_val_excerpt.jsonl")
    q = by_qid(queries)["fXx44D1sqUw"]
    assert (q.vid, q.text, q.domain) == ("fXx44D1sqUw", "dog", "dog")
    assert q.duration == pytest.approx(3196.0 / 30.0)
    assert q.fps == pytest.approx(63 / (3196.0 / 30.0))
    assert len(q.saliency["match"]) == 63
    assert q.moments == []
    surf = by_qid(queries)["t05AD0c08zE"]
    assert surf.saliency["match"] == [-1, -1, 0, 1, 1, 1]
    assert surf.fps == pytest.approx(6 / (313.0 / 29.972230202049218))
    assert {x.domain for x in queries} == {"dog", "gymnastics", "parkour", "skating", "skiing", "surfing"}


def test_tvsum_record_duration_counts_two_second_clips() -> None:
    q = by_qid(load_annotations("tvsum", DATA / "tvsum_val_excerpt.jsonl"))["sTEELN-vY30"]
    assert (q.text, q.domain) == ("BBC - Train crash 2013", "VU")
    assert q.duration == 148.0
    scores = q.saliency["scores"]
    assert len(scores) == 74 and all(len(row) == 20 for row in scores)
    assert scores[0][:5] == [5.0, 3.0, 2.0, 2.0, 1.0]
    assert q.fps is None


def test_ego4d_hand_made_sample() -> None:
    queries = load_annotations("ego4d", DATA / "ego4d_sample.jsonl", split="val")
    assert [q.qid for q in queries] == [0, 1, 2, 3, 4, 5]
    assert queries[4].moments == [[455.7, 480.0]]
    assert queries[5].moments == [[140.0, 140.0]]
    with pytest.raises(AnnotationError, match="cannot tell the split"):
        load_annotations("ego4d", DATA / "ego4d_sample.jsonl")


def test_queries_round_trip_through_dicts() -> None:
    from shards.schema import Query

    for q in load_annotations("youtube", DATA / "youtube_highlight_val_excerpt.jsonl"):
        assert Query.from_dict(json.loads(json.dumps(q.to_dict()))) == q


# --------------------------------------------------------------------------------------------
# Splits, several files, discovery


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("highlight_train_release.jsonl", "train"),
        ("highlight_test_with_gt.jsonl", "test"),
        ("nlq_val.jsonl", "val"),
        ("train.jsonl", "train"),
        ("charades-sta.validation.jsonl", "val"),
        ("trainval.jsonl", None),
        ("train_val.jsonl", None),
        ("annotations.jsonl", None),
        ("contest.jsonl", None),
    ],
)
def test_infer_split(name: str, split: str | None) -> None:
    assert infer_split(Path("data") / name) == split


def test_split_not_of_the_dataset() -> None:
    with pytest.raises(AnnotationError, match=r"Charades-STA has no split 'val'; valid splits: train, test"):
        load_annotations("charades", DATA / "charades_test_excerpt.jsonl", split="val")


def test_explicit_split_overrides_the_name() -> None:
    queries = load_annotations("charades", DATA / "charades_test_excerpt.jsonl", split="train")
    assert {q.split for q in queries} == {"train"}


def test_unknown_dataset() -> None:
    with pytest.raises(UnknownDatasetError, match="choose one of: qvhighlights, charades"):
        load_annotations("didemo", DATA / "charades_test_excerpt.jsonl")


def test_load_many_merges_files_in_order() -> None:
    files = [DATA / "qvhighlights_train_excerpt.jsonl", DATA / "qvhighlights_val_excerpt.jsonl"]
    queries = load_many("qvhighlights", files)
    assert len(queries) == 10 + 20
    assert [q.split for q in queries] == ["train"] * 10 + ["val"] * 20
    assert queries[0].qid == 9769 and queries[10].qid == 2579


def test_load_many_rejects_a_qid_in_two_files(tmp_path: Path) -> None:
    copy = tmp_path / "again_val.jsonl"
    copy.write_text((DATA / "qvhighlights_val_excerpt.jsonl").read_text().splitlines()[3] + "\n")
    with pytest.raises(AnnotationError) as info:
        load_many("qvhighlights", [DATA / "qvhighlights_val_excerpt.jsonl", copy])
    message = str(info.value)
    assert message.startswith(f"{copy}:1: field 'qid'")
    assert "qvhighlights_val_excerpt.jsonl:4" in message


def test_load_many_needs_files() -> None:
    with pytest.raises(AnnotationError, match="no QVHighlights annotation files given"):
        load_many("qvh", [])


def test_parses_a_full_size_file(tmp_path: Path) -> None:
    rows = [json.loads(r) for r in (DATA / "qvhighlights_val_excerpt.jsonl").read_text().splitlines()]
    path = tmp_path / "big_train.jsonl"
    with path.open("w") as f:
        for i in range(7218):
            f.write(json.dumps({**rows[i % len(rows)], "qid": i}) + "\n")
    queries = load_annotations("qvhighlights", path)
    assert len(queries) == 7218
    assert [q.qid for q in queries[:3]] == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# Rejected input. Each problem in a record must start with 'file:line:' and name the field.


def qvh(**change: Any) -> dict[str, Any]:
    record = {
        "qid": 1,
        "query": "a man talks.",
        "duration": 150,
        "vid": "abc_0.0_150.0",
        "relevant_windows": [[10, 20]],
        "relevant_clip_ids": [5, 6, 7, 8, 9],
        "saliency_scores": [[1, 2, 3]] * 5,
    }
    record.update(change)
    return {k: v for k, v in record.items() if v is not ...}


def write(tmp_path: Path, rows: list[Any], name: str = "bad_train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def fails(dataset: str, path: Path, line: int | None, *fragments: str) -> str:
    with pytest.raises(AnnotationError) as info:
        load_annotations(dataset, path)
    message = str(info.value)
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert message.startswith(prefix), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_valid_template_parses(tmp_path: Path) -> None:
    (q,) = load_annotations("qvhighlights", write(tmp_path, [qvh()]))
    assert q.moments == [[10.0, 20.0]] and q.saliency["clip_ids"] == [5, 6, 7, 8, 9]


def test_missing_file(tmp_path: Path) -> None:
    fails("qvhighlights", tmp_path / "nope_val.jsonl", None, "annotation file not found", "QVHighlights")


def test_folder_instead_of_file(tmp_path: Path) -> None:
    folder = tmp_path / "x_val.jsonl"
    folder.mkdir()
    fails("qvhighlights", folder, None, "is a folder")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty_test.jsonl"
    path.write_text(content)
    fails("charades", path, None, "empty annotation file")


def test_null_counts_as_missing(tmp_path: Path) -> None:
    fails("qvhighlights", write(tmp_path, [qvh(vid=None)]), 1, "missing required field 'vid'")


def test_malformed_json(tmp_path: Path) -> None:
    path = write(tmp_path, [qvh(), '{"qid": 2, "query": "x",'])
    fails("qvhighlights", path, 2, "malformed JSON")


def test_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, [qvh(), "", qvh(qid=2, duration="150")])
    fails("qvhighlights", path, 3, "field 'duration'", "must be a number")


def test_not_json_lines(tmp_path: Path) -> None:
    fails("qvhighlights", write(tmp_path, [[qvh(), qvh(qid=2)]]), 1, "expected a JSON object, got a list")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin_train.jsonl"
    path.write_bytes(json.dumps(qvh()).encode() + b"\n" + '{"query": "caf\xe9"}\n'.encode("latin-1"))
    fails("qvhighlights", path, 2, "not UTF-8")


@pytest.mark.parametrize("field", ["qid", "query", "duration", "vid"])
def test_missing_required_field(tmp_path: Path, field: str) -> None:
    second = {k: v for k, v in qvh(qid=2).items() if k != field}
    fails("qvhighlights", write(tmp_path, [qvh(), second]), 2, f"missing required field '{field}'")


@pytest.mark.parametrize(
    ("change", "field", "expected"),
    [
        ({"qid": 1.5}, "qid", "an integer or a string"),
        ({"qid": True}, "qid", "an integer or a string"),
        ({"query": 5}, "query", "a string"),
        ({"query": "  "}, "query", "is empty"),
        ({"duration": "150"}, "duration", "a number"),
        ({"duration": 0}, "duration", "must be > 0"),
        ({"duration": float("nan")}, "duration", "finite"),
        ({"vid": 42}, "vid", "a string"),
        ({"relevant_windows": "10-20"}, "relevant_windows", "a list"),
        ({"relevant_windows": [[10]]}, "relevant_windows[0]", "[start, end] pair"),
        ({"relevant_windows": [[10, "20"]]}, "relevant_windows[0]", "a number"),
        ({"relevant_clip_ids": [5, 6, 7, 8, 9.0]}, "relevant_clip_ids[4]", "an integer"),
        ({"saliency_scores": [[1, 2]] * 5}, "saliency_scores[0]", "3 worker scores"),
    ],
)
def test_wrong_types(tmp_path: Path, change: dict[str, Any], field: str, expected: str) -> None:
    fails("qvhighlights", write(tmp_path, [qvh(**change)]), 1, f"field '{field}'", expected)


def test_end_before_start(tmp_path: Path) -> None:
    path = write(tmp_path, [qvh(relevant_windows=[[0, 4], [30, 20]])])
    fails("qvhighlights", path, 1, "field 'relevant_windows[1]'", "end 20 < start 30")


def test_windows_within_one_clip_are_clamped(tmp_path: Path) -> None:
    path = write(tmp_path, [qvh(relevant_windows=[[-1.5, 4], [140, 152]])])
    assert load_annotations("qvhighlights", path)[0].moments == [[0.0, 4.0], [140.0, 150.0]]
    charades = write(
        tmp_path,
        [{"qid": 7, "query": "x", "duration": 30.5, "vid": "AB12", "relevant_windows": [[20, 31.4]]}],
    )
    assert load_annotations("charades", charades)[0].moments == [[20.0, 30.5]]


@pytest.mark.parametrize(
    ("dataset", "window", "duration"),
    [("qvhighlights", [140, 152.5], 150), ("qvhighlights", [-2.5, 4], 150), ("charades", [20, 31.6], 30.5)],
)
def test_windows_beyond_one_clip_are_rejected(
    tmp_path: Path, dataset: str, window: list, duration: float
) -> None:
    record = {"qid": 1, "query": "x", "duration": duration, "vid": "AB12", "relevant_windows": [window]}
    fails(dataset, write(tmp_path, [record]), 1, "field 'relevant_windows[0]'", "by more than one clip")


def test_window_starting_after_the_video(tmp_path: Path) -> None:
    path = write(tmp_path, [qvh(relevant_windows=[[150.5, 151]])])
    fails("qvhighlights", path, 1, "field 'relevant_windows[0]'", "at or after the video's end")


def test_duplicate_qid_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, [qvh(qid=1), qvh(qid=2), qvh(qid=1)])
    fails("qvhighlights", path, 3, "field 'qid'", "duplicate query id 1", f"{path}:1")


def test_int_and_string_qid_collide(tmp_path: Path) -> None:
    path = write(tmp_path, [qvh(qid=5), qvh(qid="5")])
    fails("qvhighlights", path, 2, "duplicate query id '5'")


def test_one_video_two_durations(tmp_path: Path) -> None:
    path = write(tmp_path, [qvh(qid=1), qvh(qid=2, duration=148, relevant_windows=[])])
    fails("qvhighlights", path, 2, "field 'duration'", "'abc_0.0_150.0'", f"{path}:1")


@pytest.mark.parametrize("vid", ["../escape", "a/b", "a\\b", "/abs/vid", "", ".hidden", "C:vid", "x\x00y"])
def test_unsafe_video_ids(tmp_path: Path, vid: str) -> None:
    fails("qvhighlights", write(tmp_path, [qvh(vid=vid)]), 1, "field 'vid'")


def test_unsafe_string_qid(tmp_path: Path) -> None:
    record = {
        "qid": "../../x_0",
        "query": "x",
        "duration": 30.0,
        "vid": "s1-d1",
        "relevant_windows": [[1, 2]],
    }
    fails("tacos", write(tmp_path, [record]), 1, "field 'qid'", "file or store key")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"saliency_scores": ...}, "missing required field 'saliency_scores'"),
        ({"relevant_clip_ids": ...}, "missing required field 'relevant_clip_ids'"),
        ({"saliency_scores": [[1, 2, 3]] * 4}, "field 'saliency_scores' has 4 rows"),
        ({"relevant_clip_ids": [5, 6, 7, 8, 75]}, "field 'relevant_clip_ids[4]' = 75 is outside"),
        ({"relevant_clip_ids": [5, 6, 7, 8, 8]}, "repeats a clip id"),
        ({"saliency_scores": [[1, 2, 5]] * 5}, "score 5 outside 0..4"),
    ],
)
def test_bad_qvhighlights_saliency(tmp_path: Path, change: dict[str, Any], fragment: str) -> None:
    fails("qvhighlights", write(tmp_path, [qvh(**change)]), 1, fragment)


def youtube(**change: Any) -> dict[str, Any]:
    record = {
        "qid": "vidA",
        "query": "dog",
        "duration": 4.0,
        "vid": "vidA",
        "relevant_windows": None,
        "label": [[0], [1]],
        "domain": "dog",
        "frames": 100.0,
        "fps": 25.0,
        "clip": [[0.0, 100.0], [50.0, 100.0]],
        "match": [-1, 1],
    }
    record.update(change)
    return {k: v for k, v in record.items() if v is not ...}


def test_youtube_minimal_record_defaults_qid_to_vid(tmp_path: Path) -> None:
    path = write(tmp_path, [youtube(qid=..., duration=..., label=..., clip=..., query=..., title="my title")])
    (q,) = load_annotations("youtube", path)
    assert (q.qid, q.text, q.duration, q.fps) == ("vidA", "my title", 4.0, 0.5)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"match": [-1, 2]}, "field 'match[1]' = 2 must be -1, 0 or 1"),
        ({"match": []}, "field 'match' is an empty list"),
        ({"domain": "cats"}, "field 'domain' 'cats' is not a YouTube Highlights domain"),
        ({"duration": 5.0}, "field 'duration' = 5 s disagrees with frames / fps = 4 s"),
        ({"label": [[0]]}, "field 'label' has 1 entries but 'match' has 2"),
        ({"fps": 0}, "field 'fps' must be > 0"),
        ({"frames": ...}, "missing required field 'frames'"),
        ({"query": ...}, "missing required field 'query' (or 'title')"),
    ],
)
def test_bad_youtube(tmp_path: Path, change: dict[str, Any], fragment: str) -> None:
    fails("youtube", write(tmp_path, [youtube(), youtube(qid="vidB", vid="vidB", **change)]), 2, fragment)


def tvsum(**change: Any) -> dict[str, Any]:
    record = {"qid": "v1", "query": "A title", "duration": 2, "vid": "v1", "label": [[1.0] * 20, [5.0] * 20]}
    record["domain"] = "BK"
    record.update(change)
    return {k: v for k, v in record.items() if v is not ...}


def test_tvsum_minimal_record(tmp_path: Path) -> None:
    (q,) = load_annotations("tvsum", write(tmp_path, [tvsum(qid=..., duration=...)]))
    assert (q.qid, q.duration, q.saliency["scores"][1][0]) == ("v1", 4.0, 5.0)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"label": [[1.0] * 19, [5.0] * 20]}, "field 'label[0]' must be a list of 20 annotator scores"),
        ({"label": [[1.0] * 20, [6.0] * 20]}, "field 'label[1]' has a score outside 1..5"),
        ({"duration": 4}, "field 'duration' = 4 must equal the number of 2-s clips in 'label' (2)"),
        ({"domain": "XX"}, "field 'domain' 'XX' is not a TVSum domain"),
        ({"label": ...}, "missing required field 'label'"),
    ],
)
def test_bad_tvsum(tmp_path: Path, change: dict[str, Any], fragment: str) -> None:
    fails("tvsum", write(tmp_path, [tvsum(**change)]), 1, fragment)
