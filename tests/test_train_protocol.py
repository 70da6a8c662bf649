"""The reference's protocol details: the validation split of each preset, what run.json records about the
process (command, version, git revision, start/resume/end times) and the warm-up check of short runs."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from r2.cli import build_app
from tests.helpers.fixtures import synthetic_store_fixture
from tests.helpers.synthetic import SyntheticSpec, synthetic_run_config
from train.config import RunConfig, apply_overrides, get_preset, preset_names
from train.engine.records import command_line, git_revision, package_version
from train.engine.rundata import choose_val_split
from train.engine.schedule import warmup_warning, warn_short_warmup, warn_sweep_warmup
from train.engine.trainer import train_run

# 4 training videos x 2 queries, batch 4: 2 optimizer steps per epoch; held out as `test` (TACoS's split)
SPEC = SyntheticSpec(n_videos=6, n_heldout=2, clips=16, layers=2, max_len=5, seed=7, heldout_split="test")
TINY = ["model.dims=32", "model.heads=4", "model.layers=2", "batch_size=4", "train.num_workers=0", "lr=1e-3"]
SHORT = ["epochs=2", "warmup=4"]  # 4 steps, all of them warm-up
PROPER = ["epochs=2", "warmup=3"]  # the 4th step runs at the full rate
WARNING = "never leaves the learning-rate warm-up"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


store = synthetic_store_fixture(SPEC)


def _cfg(*extra: str) -> RunConfig:
    return synthetic_run_config(SPEC, "tacos", [*TINY, *extra])


def _warnings(caplog) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return [m for m in messages if WARNING in m]


class _Store:
    """Just enough of a FeatureStore for :func:`choose_val_split`: annotations of the given splits."""

    def __init__(self, *splits: str, domain: str | None = None) -> None:
        self.queries = [SimpleNamespace(split=s, domain=domain) for s in splits]

    def annotations(self) -> list:
        return self.queries


# --- validation split of the presets ----------------------------------------------------------------


def test_tacos_validates_on_test_as_the_reference_does():
    store = _Store("train", "val", "test")
    cfg = get_preset("tacos")
    assert cfg.train.val_split == "test" and choose_val_split(store, cfg) == "test"
    held_out = apply_overrides(get_preset("tacos"), ["train.val_split=val"])
    assert choose_val_split(store, held_out) == "val"


@pytest.mark.parametrize(
    ("preset", "splits", "expected"),
    [  # the reference's val files: qvhighlights_val, charades_test, nlq_val, the val videos of a domain
        ("qvhighlights", ("train", "val", "test"), "val"),
        ("charades", ("train", "test"), "test"),
        ("ego4d", ("train", "val"), "val"),
        ("youtube_dog", ("train", "val"), "val"),
        ("tvsum_BK", ("train", "val"), "val"),
    ],
)
def test_other_presets_validate_where_the_reference_does(preset, splits, expected):
    cfg = get_preset(preset)
    assert cfg.train.val_split is None  # the automatic choice is the reference's split
    assert choose_val_split(_Store(*splits, domain=cfg.domain), cfg) == expected


def test_only_tacos_fixes_its_validation_split():
    fixed = {name: get_preset(name).train.val_split for name in preset_names()}
    assert {name: split for name, split in fixed.items() if split is not None} == {"tacos": "test"}


# --- run.json ---------------------------------------------------------------------------------------


def test_command_line_of_the_r2_command_and_of_a_library_call():
    assert command_line(["/venv/bin/r2", "train", "--set", "lr=1e-4", "--out", "my runs/a"]) == (
        "r2 train --set lr=1e-4 --out 'my runs/a'"
    )
    assert command_line(["/repo/r2/__main__.py", "sweep", "--preset", "tacos"]) == "r2 sweep --preset tacos"
    library = command_line(["/home/me/train_many.py", "--fast"])
    assert library.startswith("library call") and "/home/me/train_many.py --fast" in library
    assert command_line([]).startswith("library call")


def test_git_revision_reads_head_refs_packed_refs_and_worktrees(tmp_path):
    sha, other = "a" * 40, "b" * 40
    repo = tmp_path / "repo"
    (repo / ".git" / "refs" / "heads").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / ".git" / "refs" / "heads" / "main").write_text(sha + "\n")
    assert git_revision(repo) == sha
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/packed\n")
    (repo / ".git" / "packed-refs").write_text(f"# pack-refs with: peeled\n{other} refs/heads/packed\n")
    assert git_revision(repo) == other
    (repo / ".git" / "HEAD").write_text(other + "\n")  # detached
    assert git_revision(repo) == other
    tree = tmp_path / "tree"  # a worktree: .git is a file, refs live in the common dir
    private = repo / ".git" / "worktrees" / "tree"
    private.mkdir(parents=True)
    (private / "HEAD").write_text("ref: refs/heads/main\n")
    (private / "commondir").write_text("../..\n")
    tree.mkdir()
    (tree / ".git").write_text(f"gitdir: {private}\n")
    assert git_revision(tree) == sha
    assert git_revision(tmp_path / "installed") is None


def test_git_revision_of_this_checkout_matches_git():
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():  # an unpacked source tree: no revision to record
        assert git_revision() is None
        return
    assert shutil.which("git") is not None, "git is needed to cross-check the revision of this checkout"
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert head.returncode == 0, head.stderr
    assert git_revision() == head.stdout.strip()


def test_run_json_records_the_process_and_its_times(store, tmp_path):
    run = tmp_path / "run"
    train_run(_cfg("epochs=1", "warmup=1"), store, run, progress=False)
    first = json.loads((run / "run.json").read_text())
    assert first["seed"] == 42 and first["val_split"] == "test"
    assert first["command"].startswith("library call") and sys.argv[0] in first["command"]
    try:
        version = importlib.metadata.version("r2tuning-toolkit")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    assert first["version"] == version == package_version()
    assert first["git_revision"] == git_revision()
    started, ended = (datetime.fromisoformat(first[k]) for k in ("started_at", "ended_at"))
    assert started.utcoffset().total_seconds() == 0 and started <= ended
    assert first["resumed_at"] == []

    train_run(_cfg("epochs=2", "warmup=1"), store, run, resume=True, progress=False)
    second = json.loads((run / "run.json").read_text())
    assert second["started_at"] == first["started_at"] and second["command"] == first["command"]
    assert len(second["resumed_at"]) == 1
    assert datetime.fromisoformat(second["resumed_at"][0]) <= datetime.fromisoformat(second["ended_at"])
    assert datetime.fromisoformat(second["ended_at"]) >= ended


def test_r2_train_records_its_command_line(store, tmp_path, monkeypatch):
    args = ["train", "--preset", "tacos", "--store", str(store), "--out", str(tmp_path / "run"),
            "--device", "cpu", "--arch", "synthetic-tiny", "--set", "epochs=1", "--set", "warmup=1",
            *[a for item in [*TINY, "model.video_tokens=2", "model.video_width=16", "model.text_width=16"]
              for a in ("--set", item)]]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/r2", *args])
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["command"].startswith(f"r2 train --preset tacos --store {store} ")
    assert "ended_at" in info


# --- warm-up check ------------------------------------------------------------------------------------


def test_warmup_warning_gives_steps_peak_rate_and_fixes():
    cfg = apply_overrides(get_preset("charades"), ["epochs=3", "warmup=4"])
    message = warmup_warning(cfg, 1)
    assert message is not None and WARNING in message
    # the last of the 3 steps runs at lr * (0.001 + 0.999 * 2/4)
    assert "3 optimizer steps <= optim.warmup_iters=4" in message
    assert "peaks at 50.0 % of lr=0.00025" in message
    assert "--set warmup=N with N < 3" in message and "--set epochs=N with N > 4" in message
    assert warmup_warning(cfg, 2) is None  # 6 steps: the 5th and 6th leave the warm-up
    boundary = apply_overrides(get_preset("charades"), ["epochs=4", "warmup=4"])
    assert warmup_warning(boundary, 1) is not None  # 4 steps: every one still warms up
    assert warmup_warning(apply_overrides(get_preset("charades"), ["warmup=0"]), 1) is None


def test_warn_short_warmup_logs_one_line_for_many_runs(caplog):
    short = apply_overrides(get_preset("charades"), ["epochs=3", "warmup=4"])
    proper = apply_overrides(get_preset("charades"), ["epochs=30", "warmup=4"])
    with caplog.at_level(logging.WARNING):
        assert warn_short_warmup([(proper, 1)]) is None
        line = warn_short_warmup([(short, 1), (proper, 1), (short, 1)])
    assert line is not None and line.startswith("2 of 3 trials: the run never leaves")
    assert _warnings(caplog) == [line]


def test_train_run_warns_once_for_a_short_run_and_not_for_a_proper_one(store, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        train_run(_cfg(*PROPER), store, tmp_path / "proper", progress=True)
        assert _warnings(caplog) == []
        train_run(_cfg(*SHORT), store, tmp_path / "short", progress=True)
    assert len(_warnings(caplog)) == 1
    assert "2 epochs x 2 steps = 4 optimizer steps <= optim.warmup_iters=4" in _warnings(caplog)[0]


def test_sweep_warns_once_at_plan_time_not_per_trial(store, tmp_path, caplog):
    fixed = [a for item in TINY for a in ("--set", item)]
    args = ["sweep", "--preset", "tacos", "--store", str(store), "--out", str(tmp_path / "sweep"),
            "--workers", "0", "--shared-pass", "off", "--grid", "warmup=3,4,5", "--set", "epochs=2",
            *fixed]
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and warnings[0].startswith("2 of 3 trials: ")


def test_sweep_check_counts_the_trainable_queries_of_the_store(store, caplog):
    trials = [[*TINY, *PROPER], [*TINY, *SHORT]]
    with caplog.at_level(logging.WARNING):
        assert warn_sweep_warmup("tacos", store, trials[:1]) is None
        line = warn_sweep_warmup("tacos", store, trials)
    assert line is not None and "2 epochs x 2 steps" in line and line.startswith("1 of 2 trials")
