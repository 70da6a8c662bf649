"""``r2 extract``: videos + annotations -> CLIP token store (one typer command).

The options and the annotation files are checked before torch and open_clip are imported, so a user
error comes within a second. Output: one line naming the annotation files read, then the summary, the
failed videos and the videos whose length disagrees with their annotated duration (a warning; they
are listed in ``<store>/warnings.jsonl``).

Exit status: 0 every video is in the store; 1 some videos were skipped (listed in
``<store>/failures.jsonl``); 2 user error (bad option, annotation file, weights, store); 130 stopped
by Ctrl-C, 143 by SIGTERM (the videos done are kept, and the store is finished: re-run to resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from extract.config import MAX_DECODE_WORKERS, SAMPLE_DATASET, ExtractConfig, read_inputs, sample_paths
from shards.cliutil import interrupt_exit_code, interrupt_name, sigterm_as_interrupt, user_errors
from shards.cluster import DEFAULT_WORKER_TIMEOUT
from shards.errors import ConfigError
from shards.verify import MAX_CLIP_DIFF

if TYPE_CHECKING:
    from extract.job import ExtractSummary

SAMPLE_STORE = Path("cache/sample.zarr")
SHOWN = 5
"""Failed (and mismatched) videos named in the output; the files in the store list them all."""


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
        for vid, reason in list(summary.failures.items())[:SHOWN]:
            typer.echo(f"  failed {vid}: {reason}")
        typer.echo(f"all {len(summary.failures)} failure(s) are listed in {summary.failures_file}")
    if summary.mismatches:
        typer.echo(
            f"warning: {len(summary.mismatches)} video(s) shorter or longer than their annotated duration "
            f"(by more than {MAX_CLIP_DIFF:g} clips; moments beyond a video's end are clamped to it): "
            "check these video files and the 'duration' of their annotations"
        )
        for m in summary.mismatches[:SHOWN]:
            typer.echo(f"  {m.vid}: annotated {m.duration:g} s, video {m.seconds:g} s")
        typer.echo(f"all {len(summary.mismatches)} are listed in {summary.warnings_file}")


def extract(
    dataset: str = typer.Option(
        None, "--dataset", help="charades | qvhighlights | tacos | ego4d | youtube | tvsum"
    ),
    videos: Path = typer.Option(
        None, "--videos", help="folder of <vid><suffix>.<mp4|mkv|webm|avi|mov> files"
    ),
    annotations: list[str] = typer.Option(
        None,
        "--annotations",
        help="annotation file, FILE:SPLIT (split train, val or test; else the file name tells it), or a "
        "folder (one file per split, the dataset's usual names first); repeat for more",
    ),
    out: Path = typer.Option(None, "--out", help="store directory (resumed when it exists)"),
    arch: str = typer.Option(
        "ViT-B-32",
        help="any open_clip model with a ViT image tower (ViT-B-32, ViT-B-16-SigLIP, ViT-B-16-SigLIP2, "
        "EVA02-B-16, ...), hf-hub:REPO, or ViT-B/32, ViT-L/14@336px, ...",
    ),
    pretrained: str = typer.Option(
        None,
        help="TAG|FILE|random[:SEED]: any open_clip tag of --arch (openai = the default, webli, "
        "merged2b_s8b_b131k, ...), a .pt/.bin/.safetensors file, or random weights (the default with "
        "--sample; for pipeline tests)",
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
    progress: bool = typer.Option(
        True, help="progress on stderr: a bar on a terminal, else a line every --progress-interval s"
    ),
    progress_interval: float = typer.Option(
        30.0, help="seconds between two progress lines when stderr is not a terminal (batch jobs)"
    ),
    precision: str = typer.Option(
        "fp32", help="fp32 (the reference's numbers) | fp16 (autocast: faster on GPUs, tokens drift slightly)"
    ),
    token_pool: int = typer.Option(
        1,
        "--token-pool",
        help="N: average-pool each frame's patch grid N x N (token 0 kept), e.g. 2 turns the 196 patches of "
        "a B/16 into 49; N must divide the grid; 1 = no pooling",
    ),
    dtype: str = typer.Option(
        "float16",
        "--dtype",
        help="float16 | int8 (per-token scale, about half the bytes; dequantized on read)",
    ),
    sample: bool = typer.Option(False, "--sample", help=f"extract the embedded sample (into {SAMPLE_STORE})"),
) -> None:
    """Extract frozen image-text model tokens (last k blocks of both towers) of a dataset's videos and
    queries."""
    with user_errors():
        if sample:
            sample_videos, sample_files = sample_paths()
            dataset = dataset or SAMPLE_DATASET
            videos = videos or sample_videos
            annotations = annotations or [str(path) for path in sample_files]
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
            progress_interval=progress_interval,
            precision=precision,
            token_pool=token_pool,
            dtype=dtype,
        )
        try:
            with sigterm_as_interrupt():
                _extract(cfg)
        except KeyboardInterrupt as err:
            raise typer.Exit(interrupt_exit_code(err)) from None


def _extract(cfg: ExtractConfig) -> None:
    """Read the annotations (user errors before the heavy imports), extract, report; exits with the
    run's status. A ``KeyboardInterrupt`` (Ctrl-C, SIGTERM) goes on after one line saying what was done."""
    summary: ExtractSummary | None = None
    try:
        inputs = read_inputs(cfg)
        typer.echo(inputs.selection.describe())
        from extract.job import ExtractSummary, run_extraction  # imports torch and open_clip

        summary = ExtractSummary(store=cfg.out)
        summary = run_extraction(cfg, inputs=inputs, summary=summary)
    except KeyboardInterrupt as err:
        extracted = summary.extracted if summary is not None else 0
        typer.echo(
            f"{interrupt_name(err)}: {extracted} video(s) extracted into {cfg.out}; "
            "re-run the same command to resume"
        )
        raise
    _report(summary)
    raise typer.Exit(summary.exit_code)
