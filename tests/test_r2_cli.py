"""The ``r2`` entry point: user errors of every sub-command end as ``error: ...`` and exit status 2."""

from __future__ import annotations

import pytest

from r2.cli import main


def test_error_inside_a_command(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "inspect", str(tmp_path / "missing.zarr")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.zarr" in err and err.count("\n") == 1


def test_error_raised_past_a_command_is_caught_by_main(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dry-run", "--preset", "nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope" in err and "Traceback" not in err


def test_train_dry_run_takes_the_openai_spelling_of_a_backbone(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dry-run", "--preset", "qvhighlights", "--arch", "ViT-L/14@336px"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "backbone ViT-L-14-336: video tokens (T, 4, 577, 1024), query tokens (L, 4, 768)" in out
    assert "trainable parameters: " in out
