"""The ``r2`` command: one typer app composed of each package's commands.

``r2 extract | shards | train | sweep | eval | predict | serve``. Single-command packages contribute their
command function, ``shards`` its group of sub-commands. User errors (:class:`shards.errors.R2Error`)
are printed as one ``error: ...`` line with exit status 2, never as a traceback.
"""

from __future__ import annotations

import typer

from shards.cliutil import configure_logging, user_errors


def build_app() -> typer.Typer:
    """Compose the commands. Imports stay inside so that importing this module is cheap."""
    from extract.cli import extract
    from r2.eval_cli import eval_command
    from r2.predict_cli import predict
    from r2.serve.cli import serve
    from shards.cli import app as shards_app
    from train.cli import train
    from train.sweep.cli import sweep

    app = typer.Typer(
        name="r2",
        help="R²-Tuning toolkit: extract CLIP tokens once, train the R² block on them, evaluate, predict.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    app.command("extract")(extract)
    app.add_typer(shards_app, name="shards")
    app.command("train")(train)
    app.command("sweep")(sweep)
    app.command("eval")(eval_command)
    app.command("predict")(predict)
    app.command("serve")(serve)
    return app


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``r2`` console script and ``python -m r2``."""
    configure_logging()
    with user_errors():
        build_app()(args=argv, prog_name="r2")
