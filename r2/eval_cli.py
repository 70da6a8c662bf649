"""``r2 eval``: score a prediction file (file mode), or run a checkpoint on a store split, write its
predictions in the submission format and score them (checkpoint mode).

File mode is :func:`eval.cli.score_file`, checkpoint mode :func:`train.engine.score.score_checkpoint`
(the validation path of training); this module only parses the options and prints.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from shards.atomic import atomic_path
from shards.cliutil import user_errors
from shards.datasets import dataset_names
from shards.errors import ConfigError

FILE_MODE = ("--dataset", "--predictions", "--annotations")
CHECKPOINT_MODE = ("--checkpoint", "--store", "--split")
_USAGE = (
    "r2 eval scores a prediction file (needs --dataset, --predictions, --annotations; optional "
    "--postprocess) or a checkpoint on a store split (needs --checkpoint, --store, --split; optional "
    "--device)"
)


def _mode(file_options: dict[str, Any], checkpoint_options: dict[str, Any]) -> str:
    """``file`` or ``checkpoint``, from the options given (not ``None`` / not false).

    Raises:
        ConfigError: options of both modes, neither, or an incomplete set; the message says what each
            mode needs.
    """
    file_given = [name for name, value in file_options.items() if value]
    ckpt_given = [name for name, value in checkpoint_options.items() if value]
    if file_given and ckpt_given:
        raise ConfigError(f"{_USAGE}; got {', '.join(file_given)} with {', '.join(ckpt_given)}")
    if not file_given and not ckpt_given:
        raise ConfigError(f"{_USAGE}; got neither")
    mode, needed = ("file", FILE_MODE) if file_given else ("checkpoint", CHECKPOINT_MODE)
    given = file_given or ckpt_given
    lacking = [name for name in needed if name not in given]
    if lacking:
        raise ConfigError(f"{_USAGE}; {mode} mode also needs {', '.join(lacking)}")
    return mode


def _write(out: Path, write: Callable[[Path], None]) -> None:
    """``write(out)``; an OS error becomes a user error naming ``out``."""
    try:
        write(out)
    except OSError as err:
        raise ConfigError(f"cannot write {out}: {err.strerror}; choose a writable --out path") from None


def _write_json(out: Path, data: dict[str, Any]) -> None:
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")


def eval_command(
    dataset: str | None = typer.Option(
        None, "--dataset", "-d", help=f"File mode: one of {', '.join(dataset_names())}."
    ),
    predictions: Path | None = typer.Option(
        None,
        "--predictions",
        "-p",
        help="File mode: prediction JSON Lines (qid, pred_relevant_windows, pred_saliency_scores).",
    ),
    annotations: Path | None = typer.Option(
        None, "--annotations", "-a", help="File mode: the dataset's annotation file (same split)."
    ),
    postprocess: bool = typer.Option(
        False,
        "--postprocess",
        help="File mode: post-process raw windows (e.g. Grounder.predict output) as validation does "
        "first: clamp to the annotated duration, round to the dataset's clip unit, NMS.",
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", "-c", help="Checkpoint mode: a checkpoint of r2 train (best.pt, last.pt)."
    ),
    store: Path | None = typer.Option(
        None, "--store", help="Checkpoint mode: the feature store (the one the checkpoint was trained on)."
    ),
    split: str | None = typer.Option(
        None, "--split", help="Checkpoint mode: the store split to predict (val, test, ...)."
    ),
    device: str | None = typer.Option(
        None, "--device", help="Checkpoint mode: auto | cpu | cuda | cuda:N (default auto)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the official metric keys as JSON instead of a table."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="File mode: also write the metrics as JSON to this file. Checkpoint mode: the predictions "
        "file (default <checkpoint folder>/<checkpoint stem>_<split>_preds.jsonl).",
    ),
    allow_missing: bool = typer.Option(
        False,
        "--allow-missing",
        help="Score only the queries present in both files (file mode) or that have tokens in the store "
        "(checkpoint mode) instead of failing.",
    ),
) -> None:
    """Score predictions with the dataset's official metrics: a prediction file (as given, unless
    --postprocess), or a checkpoint run on a store split with the validation path of training."""
    with user_errors():
        mode = _mode(
            {"--dataset": dataset, "--predictions": predictions, "--annotations": annotations,
             "--postprocess": postprocess},
            {"--checkpoint": checkpoint, "--store": store, "--split": split, "--device": device},
        )
        if mode == "file":
            assert dataset is not None and predictions is not None and annotations is not None
            _file_mode(dataset, predictions, annotations, allow_missing, postprocess, as_json, out)
        else:
            assert checkpoint is not None and store is not None and split is not None
            _checkpoint_mode(checkpoint, store, split, device or "auto", allow_missing, as_json, out)


def _file_mode(
    dataset: str, predictions: Path, annotations: Path, allow_missing: bool, postprocess: bool, as_json: bool,
    out: Path | None,
) -> None:
    from eval.cli import score_file
    from eval.table import format_table

    spec, metrics = score_file(dataset, predictions, annotations, allow_missing, postprocess)
    if out is not None:
        _write(out, lambda path: _write_json(path, metrics))
    if as_json:
        typer.echo(json.dumps(metrics, indent=4))
    else:
        typer.echo(format_table(metrics, title=f"{spec.title}: {predictions.name} vs {annotations.name}"))


def _checkpoint_mode(
    checkpoint: Path, store: Path, split: str, device: str, allow_missing: bool, as_json: bool,
    out: Path | None,
) -> None:
    from eval.predictions import write_predictions
    from eval.table import format_table
    from train.engine.score import check_output, default_predictions_path, score_checkpoint

    target = check_output(out or default_predictions_path(checkpoint, split), checkpoint, store)
    score = score_checkpoint(checkpoint, store, split, allow_missing, device, progress=True)
    _write(target, lambda path: write_predictions(path, score.predictions))
    note = f"wrote {len(score.predictions)} predictions of split {split!r} to {target}"
    if score.missing:
        note += f" ({len(score.missing)} annotated queries without tokens left out, --allow-missing)"
    if not score.labelled:
        note += f"; split {split!r} has no ground truth: nothing scored (the file is a submission)"
    if as_json:
        typer.echo(json.dumps(score.validation.report, indent=4))
        typer.echo(note, err=True)
        return
    if score.labelled:
        title = f"{score.spec.title}: {checkpoint} on split {split!r} of {store}"
        typer.echo(format_table(score.validation.report, title=title))
    typer.echo(note)
