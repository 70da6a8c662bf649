"""The ``r2`` command: one typer app composed of each package's sub-app.

``r2 extract | shards | train | sweep | eval | predict``. User errors (:class:`shards.errors.R2Error`)
are printed as one ``error: ...`` line with exit status 2, never as a traceback.
"""

from __future__ import annotations

import sys

import typer

from shards.errors import R2Error


def build_app() -> typer.Typer:
    """Compose the sub-apps. Imports stay inside so that ``r2 --help`` lists every command."""
    from eval.cli import app as eval_app
    from extract.cli import app as extract_app
    from r2.predict_cli import app as predict_app
    from shards.cli import app as shards_app
    from train.cli import app as train_app
    from train.sweep_cli import app as sweep_app

    app = typer.Typer(
        name="r2",
        help="R²-Tuning toolkit: extract CLIP tokens once, train the R² block on them, evaluate, predict.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    app.add_typer(extract_app, name="extract")
    app.add_typer(shards_app, name="shards")
    app.add_typer(train_app, name="train")
    app.add_typer(sweep_app, name="sweep")
    app.add_typer(eval_app, name="eval")
    app.add_typer(predict_app, name="predict")
    return app


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``r2`` console script and ``python -m r2``."""
    try:
        build_app()(args=argv, prog_name="r2")
    except R2Error as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
