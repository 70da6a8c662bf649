"""``r2 predict VIDEO "sentence" --checkpoint C [--plot out.png]``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from shards.cliutil import user_errors

app = typer.Typer(
    help="Find the moments of a raw video that match a sentence (CLIP runs on the fly).",
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def predict(
    video: Path = typer.Argument(..., help="Video file (any length, any format FFmpeg reads)."),
    sentences: list[str] = typer.Argument(..., help="One or more sentences to ground."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="best.pt / last.pt written by r2 train."),
    plot: Path | None = typer.Option(
        None, help="PNG with the saliency curve and the top moments (one file per sentence: -1, -2 ...)."
    ),
    top: int = typer.Option(5, help="How many moments to print per sentence."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    weights: str | None = typer.Option(
        None, help="CLIP weights file if the one recorded in the checkpoint moved (checksum must match)."
    ),
    fps: float | None = typer.Option(
        None, help="Sampling rate; only for checkpoints trained at per-video rates."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the predictions as JSON lines."),
) -> None:
    """Print the top moments of each sentence in VIDEO, and optionally plot them."""
    from r2.predict import Predictor

    with user_errors():
        predictor = Predictor.from_checkpoint(checkpoint, device=device, weights=weights, fps=fps)
        encoded = predictor.encode_video(video)
        for i, sentence in enumerate(sentences):
            result = predictor.predict(encoded, sentence)
            if as_json:
                typer.echo(
                    json.dumps(
                        {
                            "video": str(video),
                            "query": sentence,
                            "pred_relevant_windows": [
                                [round(float(v), 4) for v in row] for row in result.moments
                            ],
                            "pred_saliency_scores": [round(float(v), 4) for v in result.saliency],
                        }
                    )
                )
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
