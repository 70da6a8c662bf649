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
