"""The shared CLI error handling: an R2Error becomes one ``error: ...`` line and exit status 2."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from shards.cliutil import user_errors
from shards.errors import StoreError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def fail(kind: str) -> None:
    with user_errors():
        if kind == "user":
            raise StoreError("store x.zarr is broken; rebuild it")
        if kind == "bug":
            raise ValueError("a programming error")
    typer.echo("done")


def test_user_error_in_a_command_prints_one_line_and_exits_2() -> None:
    result = CliRunner().invoke(app, ["user"])
    assert result.exit_code == 2
    assert result.stderr == "error: store x.zarr is broken; rebuild it\n"
    assert result.stdout == ""


def test_other_exceptions_and_success_pass_through() -> None:
    result = CliRunner().invoke(app, ["bug"])
    assert isinstance(result.exception, ValueError) and result.exit_code == 1
    result = CliRunner().invoke(app, ["fine"])
    assert (result.exit_code, result.stdout) == (0, "done\n")


def test_around_plain_code_it_exits_with_status_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info, user_errors():
        raise StoreError("no such store")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: no such store\n"


@pytest.mark.parametrize(
    ("via_make", "words"), [(False, ["--resume", "--out DIR"]), (True, ["RESUME=1", "RUN=DIR"])]
)
def test_a_way_out_is_named_in_the_terms_the_user_typed(tmp_path, monkeypatch, via_make, words) -> None:
    from train.engine.runlog import RunDirError, prepare_run_dir

    if via_make:
        monkeypatch.setenv("R2_VIA_MAKE", "1")
    else:
        monkeypatch.delenv("R2_VIA_MAKE", raising=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("x")
    with pytest.raises(RunDirError) as err:
        prepare_run_dir(tmp_path / "run", resume=False)
    assert all(word in str(err.value) for word in words), str(err.value)
