"""Dataset registry: names, aliases, reference facts, file names, safe ids."""

from __future__ import annotations

import pytest

from shards.datasets import dataset_names, get_dataset, video_filename_stem
from shards.errors import R2Error, UnknownDatasetError
from shards.paths import unsafe_id_reason

NAMES = ["qvhighlights", "charades", "tacos", "ego4d", "youtube", "tvsum", "custom"]


def test_registry_lists_the_six_datasets_and_custom() -> None:
    assert dataset_names() == NAMES
    assert [get_dataset(n).name for n in NAMES] == NAMES


@pytest.mark.parametrize(
    ("name", "fps", "clip_unit", "task", "nms_mode", "nms_thres"),
    [
        ("qvhighlights", 0.5, 2.0, "mr", "normal", 0.7),
        ("charades", 1.0, 0.1, "mr", "linear", None),
        ("tacos", 0.5, None, "mr", "linear", None),
        ("ego4d", 0.5, None, "mr", "linear", None),
        ("youtube", None, None, "hd", None, None),
        ("tvsum", 0.5, None, "hd", None, None),
        ("custom", 0.5, None, "mr", "normal", 0.7),
    ],
)
def test_reference_facts(
    name: str,
    fps: float | None,
    clip_unit: float | None,
    task: str,
    nms_mode: str | None,
    nms_thres: float | None,
) -> None:
    spec = get_dataset(name)
    assert (spec.fps, spec.clip_unit, spec.task, spec.nms_mode, spec.nms_thres) == (
        fps,
        clip_unit,
        task,
        nms_mode,
        nms_thres,
    )


def test_clip_seconds() -> None:
    assert get_dataset("qvhighlights").clip_seconds == 2.0
    assert get_dataset("charades").clip_seconds == 1.0
    assert get_dataset("youtube").clip_seconds is None


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("QVHighlights", "qvhighlights"),
        ("qvh", "qvhighlights"),
        ("Charades-STA", "charades"),
        ("charades_sta", "charades"),
        (" TACoS ", "tacos"),
        ("Ego4D-NLQ", "ego4d"),
        ("youtube_highlights", "youtube"),
        ("TVSUM", "tvsum"),
    ],
)
def test_aliases_are_case_insensitive(alias: str, name: str) -> None:
    assert get_dataset(alias).name == name


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(UnknownDatasetError) as info:
        get_dataset("activitynet")
    message = str(info.value)
    assert "'activitynet'" in message
    assert all(n in message for n in NAMES)
    assert isinstance(info.value, R2Error)


def test_video_filename_stem_appends_the_tacos_camera() -> None:
    assert video_filename_stem(get_dataset("tacos"), "s34-d28") == "s34-d28-cam-002"
    assert video_filename_stem(get_dataset("qvh"), "j7rJstUseKg_360.0_510.0") == "j7rJstUseKg_360.0_510.0"


@pytest.mark.parametrize(
    "vid",
    ["j7rJstUseKg_360.0_510.0", "-esJrBWj2d8", "_6hnl_BrFvs_60.0_210.0", "s34-d28", "0a1b2c3d-0000-4000"],
)
def test_real_ids_are_safe(vid: str) -> None:
    assert unsafe_id_reason(vid) is None


@pytest.mark.parametrize(
    ("vid", "reason"),
    [
        ("", "empty"),
        ("..", "'.'"),
        (".hidden", "'.'"),
        ("../x", "'.'"),
        ("a/../../etc", "'/'"),
        ("/abs/path", "'/'"),
        ("a\\b", "'\\\\'"),
        ("C:video", "':'"),
        (" padded", "white space"),
        ("tab\there", "'\\t'"),
        ("x" * 201, "longer than 200"),
    ],
)
def test_unsafe_ids_are_rejected(vid: str, reason: str) -> None:
    result = unsafe_id_reason(vid)
    assert result is not None and reason in result
