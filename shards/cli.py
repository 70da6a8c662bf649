"""``r2 shards``: inspect, verify and import feature stores.

Exit status: 0 success, 1 ``verify`` found problems, 2 user error (printed as ``error: ...``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from shards.cliutil import user_errors
from shards.verify import MAX_CLIP_DIFF

app = typer.Typer(
    name="shards",
    help="Inspect, verify and import Zarr feature stores.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

StorePath = Annotated[
    Path, typer.Argument(help="Store directory (e.g. cache/qvhighlights/ViT-B-32_k4_0.5fps.zarr).")
]
Dataset = Annotated[
    str, typer.Option("--dataset", "-d", help="Dataset registry name (qvhighlights, tacos, ...).")
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Store to create, or to resume when it exists.")]
AnnotationFiles = Annotated[
    list[Path] | None,
    typer.Option("--annotations", "-a", help="Annotation file of the dataset to store (repeatable)."),
]
Backbone = Annotated[
    str,
    typer.Option(
        "--backbone",
        "--arch",
        help="Backbone the features came from: any open_clip ViT name (ViT-B-32, ViT-H-14, ...) or an "
        "OpenAI spelling (ViT-B/32, ViT-L/14@336px).",
    ),
]
Pretrained = Annotated[
    str, typer.Option(help="Weights tag of the backbone ('openai' for the reference caches).")
]
WeightsSha = Annotated[
    str, typer.Option("--weights-sha256", help="Checksum of the backbone weights, if known.")
]
Fps = Annotated[float | None, typer.Option(help="Clips per second of the cache (default: the dataset's).")]
FrameSize = Annotated[
    int | None, typer.Option(help="Input resolution in px; only for a backbone the registry does not know.")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


@app.command()
def inspect(
    store: StorePath,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Counts, shapes, bytes and the manifest of a store."""
    from shards.report import format_summary, inspect_store

    with user_errors():
        info = inspect_store(store)
    typer.echo(json.dumps(info, indent=2) if as_json else format_summary(info))


@app.command()
def verify(
    store: StorePath,
    quick: Annotated[
        bool, typer.Option("--quick", help="Skip the checksums (metadata and sizes only).")
    ] = False,
    max_clip_diff: Annotated[
        float, typer.Option(help="Tolerated |T - duration x fps| in clips before a video is reported.")
    ] = MAX_CLIP_DIFF,
    quiet: Quiet = False,
) -> None:
    """Check a store; lists every problem and exits 1 if there is any."""
    from shards.verify import verify_store

    with user_errors():
        report = verify_store(store, checksums=not quick, max_clip_diff=max_clip_diff, progress=not quiet)
    checked = "with checksums" if report.checksums else "without checksums (--quick)"
    typer.echo(
        f"checked {report.videos} videos, {report.queries_with_tokens} queries with tokens in "
        f"{report.query_parts} part(s), {report.annotations} annotations, {checked}; "
        f"{report.token_bytes / 1e6:.1f} MB of {report.dtype} tokens"
    )
    for p in report.problems:
        typer.echo(f"{p.kind}\t{p.item}\t{p.detail}")
    if not report.ok:
        typer.echo(f"{len(report.problems)} problem(s) found in {report.store}", err=True)
        raise typer.Exit(1)
    typer.echo("ok")


def _run_import(fn: Callable[..., Any], **kwargs: Any) -> None:
    """Run importer ``fn`` and print its summary lines."""
    with user_errors():
        summary = fn(**kwargs)
    typer.echo("\n".join(summary.lines()))


@app.command("import-npy")
def import_npy(
    dataset: Dataset,
    video_dir: Annotated[Path, typer.Option(help="Folder of <vid>.npy files (T, k, P, C).")],
    out: Out,
    query_dir: Annotated[Path | None, typer.Option(help="Folder of <qid>.npy files (L, k, Cq).")] = None,
    annotations: AnnotationFiles = None,
    backbone: Backbone = "ViT-B-32",
    pretrained: Pretrained = "openai",
    weights_sha256: WeightsSha = "unknown",
    fps: Fps = None,
    frame_size: FrameSize = None,
    quiet: Quiet = False,
) -> None:
    """Import an official R²-Tuning .npy cache (resumable)."""
    from shards.importers import import_npy as run

    _run_import(
        run,
        dataset=dataset,
        video_dir=video_dir,
        out=out,
        query_dir=query_dir,
        annotations=annotations or [],
        backbone=backbone,
        pretrained=pretrained,
        weights_sha256=weights_sha256,
        fps=fps,
        frame_size=frame_size,
        progress=not quiet,
    )


@app.command("import-h5")
def import_h5(
    dataset: Dataset,
    h5: Annotated[Path, typer.Option("--h5", help="HDF5 file with one (T, k, P, C) dataset per video id.")],
    out: Out,
    video_group: Annotated[str, typer.Option(help="Group holding the video datasets.")] = "/",
    query_group: Annotated[
        str, typer.Option(help="Group holding (L, k, Cq) query datasets, if any.")
    ] = "queries",
    annotations: AnnotationFiles = None,
    backbone: Backbone = "ViT-B-32",
    pretrained: Pretrained = "openai",
    weights_sha256: WeightsSha = "unknown",
    fps: Fps = None,
    frame_size: FrameSize = None,
    quiet: Quiet = False,
) -> None:
    """Import an HDF5 token file (resumable)."""
    from shards.importers import import_h5 as run

    _run_import(
        run,
        dataset=dataset,
        h5_path=h5,
        out=out,
        annotations=annotations or [],
        video_group=video_group,
        query_group=query_group,
        backbone=backbone,
        pretrained=pretrained,
        weights_sha256=weights_sha256,
        fps=fps,
        frame_size=frame_size,
        progress=not quiet,
    )
