"""``r2 extract``: videos + annotations -> CLIP token store (one typer command).

Exit status: 0 every video is in the store; 1 some videos were skipped (listed in
``<store>/failures.jsonl``); 2 user error (bad option, annotation file, weights, store).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from extract.config import MAX_DECODE_WORKERS, SAMPLE_DATASET, ExtractConfig, sample_paths
from shards.cliutil import user_errors
from shards.cluster import DEFAULT_WORKER_TIMEOUT
from shards.errors import ConfigError

if TYPE_CHECKING:
    from extract.job import ExtractSummary

SAMPLE_STORE = Path("cache/sample.zarr")

def _parse_fps(value: str | None) -> float | None:
    if value is None or value.strip().lower() == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"--fps must be a number of frames per second or 'auto', got {value!r}") from None


def _parse_workers(value: str) -> int | None:
    """``auto`` -> ``None`` (:func:`extract.config.decode_workers` decides), else a positive integer."""
    if value.strip().lower() == "auto":
        return None
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if workers < 1:
        raise ConfigError(f"--workers must be 'auto' or a number of decoding threads >= 1, got {value!r}")
    return workers


def _report(summary: ExtractSummary) -> None:
    typer.echo(
        f"store {summary.store}: {summary.extracted} video(s) extracted ({summary.frames} frames), "
        f"{summary.already_done} already done, {len(summary.failures)} failed, "
        f"{summary.queries_written} new queries, {summary.annotations} annotations, {summary.seconds:.1f} s"
    )
    if summary.random_weights:
        typer.echo("note: the backbone has RANDOM weights; these features only test the pipeline")
    if summary.failures:
        for vid, reason in list(summary.failures.items())[:5]:
            typer.echo(f"  failed {vid}: {reason}")
        typer.echo(f"all {len(summary.failures)} failure(s) are listed in {summary.failures_file}")


def extract(
    dataset: str = typer.Option(
        None, "--dataset", help="charades | qvhighlights | tacos | ego4d | youtube | tvsum"
    ),
    videos: Path = typer.Option(
        None, "--videos", help="folder of <vid><suffix>.<mp4|mkv|webm|avi|mov> files"
    ),
    annotations: list[Path] = typer.Option(
        None, "--annotations", help="annotation file; repeat for more splits"
    ),
    out: Path = typer.Option(None, "--out", help="store directory (resumed when it exists)"),
    arch: str = typer.Option(
        "ViT-B-32", help="any open_clip ViT name (ViT-B-32, ViT-H-14, ...) or ViT-B/32, ViT-L/14@336px, ..."
    ),
    pretrained: str = typer.Option(
        None, help="openai (default), a .pt/.bin/.safetensors file, or random[:SEED] (default with --sample)"
    ),
    fps: str = typer.Option(None, help="frames per second, or 'auto' = the dataset's rate (default)"),
    layers: int = typer.Option(4, help="k: last blocks kept from each tower"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    batch_size: int = typer.Option(32, help="frames per image-tower forward pass"),
    workers: str = typer.Option(
        "auto",
        help=f"video decoding threads per process: auto = one per usable CPU core minus one "
        f"(1..{MAX_DECODE_WORKERS}), or a number",
    ),
    scheduler: str = typer.Option(None, help="dask scheduler ADDRESS to fan out over, or 'local'"),
    dask_workers: int = typer.Option(None, help="LocalCluster worker processes (default: one per GPU)"),
    worker_timeout: float = typer.Option(
        DEFAULT_WORKER_TIMEOUT, help="seconds to wait for the first worker of the --scheduler cluster"
    ),
    limit: int = typer.Option(None, help="only the first N videos of the annotations"),
    seed: int = typer.Option(0, help="seed of random weights"),
    cache_dir: str = typer.Option(None, help="where OpenAI weights are cached / downloaded"),
    progress: bool = typer.Option(True, help="progress bar on stderr"),
    precision: str = typer.Option(
        "fp32", help="fp32 (the reference's numbers) | fp16 (autocast: faster on GPUs, tokens drift slightly)"
    ),
    sample: bool = typer.Option(False, "--sample", help=f"extract the embedded sample (into {SAMPLE_STORE})"),
) -> None:
    """Extract frozen CLIP tokens (last k blocks of both towers) of a dataset's videos and queries."""
    with user_errors():
        if sample:
            sample_videos, sample_files = sample_paths()
            dataset = dataset or SAMPLE_DATASET
            videos = videos or sample_videos
            annotations = annotations or sample_files
            out = out or SAMPLE_STORE
            pretrained = pretrained or "random"
        missing = [
            name
            for name, value in (
                ("--dataset", dataset),
                ("--videos", videos),
                ("--annotations", annotations),
                ("--out", out),
            )
            if not value
        ]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)} (or pass --sample for the embedded sample)")
        cfg = ExtractConfig(
            dataset=dataset,
            videos=videos,
            annotations=list(annotations),
            out=out,
            arch=arch,
            pretrained=pretrained or "openai",
            fps=_parse_fps(fps),
            layers=layers,
            device=device,
            batch_size=batch_size,
            workers=_parse_workers(workers),
            scheduler=scheduler,
            dask_workers=dask_workers,
            worker_timeout=worker_timeout,
            limit=limit,
            seed=seed,
            cache_dir=cache_dir,
            progress=progress,
            precision=precision,
        )
        from extract.job import run_extraction  # imports open_clip: only when extracting

        summary = run_extraction(cfg)
    _report(summary)
    raise typer.Exit(summary.exit_code)
