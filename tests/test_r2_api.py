"""The public API in ``r2``: exported names resolve, ``import r2`` is cheap, the README uses only ``r2``."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import r2

ROOT = Path(__file__).resolve().parent.parent
ISSUE_NAMES = {
    "Predictor", "Grounder", "open_store", "create_store", "load_backbone", "train_run", "evaluate"
}


def test_every_exported_name_comes_from_the_module_that_defines_it() -> None:
    assert set(r2.__all__) >= ISSUE_NAMES
    assert sorted(r2.__all__) == sorted(set(r2._SOURCES))
    for name in r2.__all__:
        assert getattr(r2, name).__module__ == r2._SOURCES[name], name
    assert set(r2.__all__) <= set(dir(r2))
    with pytest.raises(AttributeError, match="no attribute 'Trainer'"):
        r2.Trainer  # noqa: B018


def test_import_r2_and_the_command_module_do_not_load_torch() -> None:
    code = (
        "import sys, r2, r2.cli; "
        "heavy = sorted(m for m in ('torch', 'open_clip') if m in sys.modules); "
        "print(','.join(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def _readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_section_imports_only_from_r2() -> None:
    blocks = _readme_python_blocks()
    assert blocks, "README.md has no ```python block"
    imported: set[str] = set()
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom):
                assert node.module == "r2", f"README imports from {node.module}"
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                assert [alias.name for alias in node.names] == ["r2"], "README imports a non-r2 module"
    assert {"Predictor", "Grounder", "open_store"} <= imported
    assert imported <= set(r2.__all__)


def test_readme_python_blocks_run_as_written_after_make_demo(tmp_path, monkeypatch) -> None:
    """The README's Python section, executed in a folder holding what `make demo` writes."""
    from typer.testing import CliRunner

    from r2.cli import build_app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "extract").mkdir()
    (tmp_path / "extract" / "sample").symlink_to(ROOT / "extract" / "sample")
    app, runner = build_app(), CliRunner()
    steps = [
        ["extract", "--sample", "--out", "cache/sample.zarr", "--no-progress"],
        ["train", "--preset", "charades", "--store", "cache/sample.zarr", "--out", "runs/demo",
         "--device", "cpu", "--set", "epochs=2", "--set", "batch_size=4", "--set", "warmup=1",
         "--set", "train.num_workers=0"],
    ]
    for args in steps:
        done = runner.invoke(app, args)
        assert done.exit_code == 0, done.output
    namespace: dict[str, object] = {}
    for block in _readme_python_blocks():
        exec(compile(block, "README.md", "exec"), namespace)
    moments, raw, result = namespace["moments"], namespace["raw"], namespace["result"]
    assert len(moments) >= 1 and all(0.0 <= start <= end <= 31.0 for start, end, _ in moments)
    assert raw.moments.shape[1] == 3 and raw.saliency.ndim == 1
    assert result.best_epoch is not None and (tmp_path / "runs" / "mine" / "val_preds.jsonl").is_file()
