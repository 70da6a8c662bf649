"""Which annotation files are read: FILE, FILE:SPLIT, or a folder with one file per split."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from shards.annotation_files import KNOWN_FILES, resolve_annotation_args, select_annotation_files
from shards.annotations import load_many
from shards.errors import AnnotationError

DATA = Path(__file__).parent / "data" / "annotations"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def qvh_folder(tmp_path: Path) -> Path:
    """The official QVHighlights file names, both test files included (same query ids)."""
    folder = tmp_path / "qvhighlights"
    folder.mkdir()
    files = {
        "train": ["highlight_train_release.jsonl"],
        "val": ["highlight_val_release.jsonl"],
        "test": ["highlight_test_release.jsonl", "highlight_test_with_gt.jsonl"],
    }
    for split, names in files.items():
        for name in names:
            shutil.copy(DATA / f"qvhighlights_{split}_excerpt.jsonl", folder / name)
    (folder / "notes.jsonl").write_text("{}\n")
    return folder


def test_a_folder_gives_one_file_per_split_the_documented_one_first(qvh_folder: Path) -> None:
    selection = select_annotation_files(qvh_folder, "qvhighlights")
    assert [(p.name, s) for p, s in selection.files] == [
        ("highlight_train_release.jsonl", "train"),
        ("highlight_val_release.jsonl", "val"),
        ("highlight_test_with_gt.jsonl", "test"),
    ]
    line = selection.describe()
    assert "highlight_test_release.jsonl (test: highlight_test_with_gt.jsonl preferred)" in line
    assert "notes.jsonl (no split in its name)" in line
    queries = load_many("qvhighlights", [qvh_folder])
    assert len(queries) == 40 and {q.split for q in queries} == {"train", "val", "test"}


def test_every_file_of_a_folder_used_to_repeat_query_ids(qvh_folder: Path) -> None:
    with pytest.raises(AnnotationError, match="duplicate query id"):
        load_many("qvhighlights", sorted(qvh_folder.glob("highlight_*.jsonl")))


def test_two_unknown_files_of_one_split_are_named(tmp_path: Path) -> None:
    for name in ("mine_train_a.jsonl", "mine_train_b.jsonl"):
        shutil.copy(DATA / "charades_train_excerpt.jsonl", tmp_path / name)
    with pytest.raises(AnnotationError, match=r"2 train annotation files \(mine_train_a.jsonl, mine_train_b"):
        select_annotation_files(tmp_path, "charades")


def test_a_folder_without_split_files_says_how_to_name_them(tmp_path: Path) -> None:
    (tmp_path / "mine.jsonl").write_text("{}\n")
    with pytest.raises(AnnotationError, match="--annotations FILE:SPLIT"):
        select_annotation_files(tmp_path, "custom")


def test_files_and_file_split_pass_through_in_order(tmp_path: Path) -> None:
    selection = resolve_annotation_args(["a_test.jsonl", f"{tmp_path / 'b.jsonl'}:val"], "tacos")
    assert selection.files == [(Path("a_test.jsonl"), None), (tmp_path / "b.jsonl", "val")]


def test_the_docs_table_lists_the_known_names_in_order() -> None:
    text = (ROOT / "docs" / "datasets.md").read_text(encoding="utf-8")
    for dataset, splits in KNOWN_FILES.items():
        row = re.search(rf"^\| {dataset} \|(.*)$", text, flags=re.M)
        assert row, dataset
        cells = [re.findall(r"`([^`]+)`", cell) for cell in row.group(1).split("|")[:3]]
        columns = zip(("train", "val", "test"), cells, strict=True)
        documented = {split: tuple(names) for split, names in columns if names}
        assert documented == splits, dataset
