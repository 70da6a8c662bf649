"""``r2 predict VIDEO "sentence" --checkpoint C [--plot out.png]``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import typer

from eval.predictions import QueryPrediction
from shards.cliutil import user_errors
from shards.errors import ConfigError, VideoError

if TYPE_CHECKING:
    from r2.predict import VideoPrediction

def submission_record(qid: int | str, vid: str, result: VideoPrediction) -> dict[str, Any]:
    """One line of the submission format ``r2 eval`` reads (:mod:`eval.predictions`), with the
    ``query`` text, keys in the official order; seconds and scores to 4 decimals."""
    windows = np.round(result.moments.astype(np.float64), 4)
    saliency = np.round(result.saliency.astype(np.float64), 4)
    return QueryPrediction(qid, vid, windows, saliency, query=result.query).to_dict()


def predict(
    video: Path = typer.Argument(..., help="Video file (any length, any format FFmpeg reads)."),
    sentences: list[str] = typer.Argument(..., help="One or more sentences to ground."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="best.pt / last.pt written by r2 train."),
    plot: Path | None = typer.Option(
        None,
        help="PNG with the saliency curve and the top moments; with several sentences one file each, "
        "named after it with -1, -2, ... (out.png -> out-1.png, out-2.png).",
    ),
    top: int = typer.Option(5, help="How many moments to print per sentence (at least 1)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    weights: str | None = typer.Option(
        None, help="CLIP weights file if the one recorded in the checkpoint moved (checksum must match)."
    ),
    fps: float | None = typer.Option(
        None,
        help="Clips per second, for checkpoints trained at per-video rates (at most the video's frame rate); "
        "a fixed-rate checkpoint's own rate is used and another one refused.",
    ),
    precision: str | None = typer.Option(
        None,
        help="What the CLIP towers compute in: fp32 | fp16 (autocast: faster on GPUs, tokens drift "
        "slightly); default: the precision of the checkpoint's feature store (fp32 for older stores).",
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print one line per sentence in the submission format r2 eval reads (qid, vid = the video "
        "file's stem, query, pred_relevant_windows, pred_saliency_scores).",
    ),
    qids: list[str] | None = typer.Option(
        None, "--qid", help="Query id of each sentence in --json output, in order (default: 0, 1, ...)."
    ),
) -> None:
    """Print the top moments of each sentence in VIDEO, and optionally plot them."""
    from r2.predict import Predictor

    with user_errors():
        if qids and len(qids) != len(sentences):
            raise ConfigError(f"{len(qids)} --qid values for {len(sentences)} sentences: give one each")
        empty = [str(i) for i, sentence in enumerate(sentences, 1) if not sentence.strip()]
        if empty:
            which = f"sentence {empty[0]} is" if len(empty) == 1 else f"sentences {', '.join(empty)} are"
            raise ConfigError(f"{which} empty: give the text to ground")
        if top < 1:
            raise ConfigError(f"--top must be at least 1, got {top}")
        if video.is_dir():
            raise VideoError(f"{video} is a folder, not a video file")
        predictor = Predictor.from_checkpoint(
            checkpoint, device=device, weights=weights, fps=fps, precision=precision
        )
        encoded = predictor.encode_video(video)
        for i, sentence in enumerate(sentences):
            result = predictor.predict(encoded, sentence)
            if as_json:
                qid = (int(qids[i]) if qids[i].isdigit() else qids[i]) if qids else i
                typer.echo(json.dumps(submission_record(qid, video.stem, result)))
            else:
                typer.echo(f"“{sentence}”  ({encoded.duration:.1f} s, {len(encoded.tokens)} clips)")
                for rank, (start, end, score) in enumerate(result.moments[:top], 1):
                    typer.echo(f"  {rank}. {start:7.1f} s – {end:7.1f} s   score {score:.3f}")
                if len(result.moments) == 0:
                    peak = int(result.saliency.argmax())
                    typer.echo(f"  most salient clip: {peak / result.fps:.1f} s")
            if plot is not None:
                from eval.plot import plot_prediction

                out = plot if len(sentences) == 1 else plot.with_name(f"{plot.stem}-{i + 1}{plot.suffix}")
                plot_prediction(
                    result.saliency, result.fps, result.moments, out, query=sentence, title=video.name
                )
                typer.echo(f"  plot: {out}", err=as_json)
