"""``r2 sweep``: a hyper-parameter sweep over a feature store (grid, random search or a spec file).

Thin layer over :mod:`train.sweep`: parse options, print progress lines, the ranked table (mean ± std
over seeds per configuration with ``--seeds N``) and the best configuration's ``r2 train`` command.
Exit status: 0 when every trial finished, 1 when some failed (their errors are in the table and in each
trial's ``error.txt``), 130 when interrupted (finished trials are kept; re-run the same command to continue).
"""

from __future__ import annotations

from pathlib import Path

import typer

from shards.cluster import DEFAULT_WORKER_TIMEOUT, check_worker_timeout
from train.sweep.results import PLOT_FILE, RESULTS_CSV, RESULTS_JSON, best_summary, format_table
from train.sweep.runner import SHARED_PASS_MODES, SweepError, check_device, plan_sweep, run_sweep
from train.sweep.spec import build_spec
from train.sweep.trials import TrialRecord


def sweep(
    preset: str | None = typer.Option(
        None, "--preset", help="Config preset (e.g. charades, qvhighlights, tacos)."
    ),
    store: str | None = typer.Option(None, "--store", help="Feature store (.zarr) to train on."),
    grid: list[str] = typer.Option([], "--grid", help="KEY=V1,V2,... every value (repeat for a product)."),
    n_random: int | None = typer.Option(
        None, "--random", help="Number of random draws from the --range options."
    ),
    ranges: list[str] = typer.Option(
        [], "--range", help="KEY=LOW:HIGH[:log][:int|:float] or KEY=A,B,C (choice); repeatable."
    ),
    spec: Path | None = typer.Option(
        None, "--spec", help="Sweep spec file (.json or .toml); options override it."
    ),
    fixed: list[str] = typer.Option([], "--set", help="KEY=VALUE fixed for every trial; repeatable."),
    out: Path | None = typer.Option(None, "--out", help="Sweep folder (default: runs/sweeps/PRESET)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the random draws (default 0)."),
    seeds: int | None = typer.Option(
        None, "--seeds", help="Train every configuration with N training seeds (the preset's seed, or "
        "--set seed=S, and the next N-1); report mean ± std over them."
    ),
    workers: int | None = typer.Option(
        None, "--workers", help="LocalCluster worker processes (default: one per core or GPU); 0 = run here."
    ),
    scheduler: str | None = typer.Option(None, "--scheduler", help="Address of an existing dask scheduler."),
    worker_timeout: float = typer.Option(
        DEFAULT_WORKER_TIMEOUT, "--worker-timeout",
        help="Seconds to wait for the first worker of the --scheduler cluster before giving up.",
    ),
    threads: int | None = typer.Option(
        None, "--threads", help="Torch threads per trial (default: cores / workers; 1 with --scheduler); "
        "recorded per trial, and the best command repeats it."
    ),
    device: str = typer.Option(
        "auto", "--device", help="Device of the trials: auto or cuda (every visible GPU, one worker each), "
        "cuda:N (GPU N only), cpu."
    ),
    shared_pass: str = typer.Option(
        "auto", "--shared-pass", help="Train compatible trials on one shared data pass: auto, on, off."
    ),
) -> None:
    """Run a hyper-parameter sweep: one trial per configuration and seed, ranked by the preset's key metric
    (its mean over the seeds)."""
    if shared_pass not in SHARED_PASS_MODES:
        raise SweepError(f"--shared-pass {shared_pass!r}: use one of {', '.join(SHARED_PASS_MODES)}")
    check_worker_timeout(worker_timeout)
    if not scheduler:
        check_device(device)
    sweep_spec = build_spec(spec_file=spec, preset=preset, store=store, grid=grid, ranges=ranges,
                            n_random=n_random, fixed=fixed, seed=seed, seeds=seeds)
    plan = plan_sweep(sweep_spec, out, device=device)
    from train.engine.schedule import warn_sweep_warmup  # torch: only once a sweep runs

    warn_sweep_warmup(plan.preset, plan.store, [r.override_list() for r in plan.requests])
    total = len(plan.requests)
    per_config = f" ({sweep_spec.n_seeds} seeds per configuration)" if sweep_spec.n_seeds else ""
    typer.echo(f"sweep of {plan.preset}: {total} trials{per_config} -> {plan.out_dir}")
    seen = 0

    def report(record: TrialRecord) -> None:
        nonlocal seen
        seen += 1
        value = record.metrics.get(plan.key_metric)
        shown = f"{plan.key_metric}={value:.4g}" if value is not None else record.error or ""
        how = "reused" if record.reused else f"{record.seconds:.1f} s"
        typer.echo(f"[{seen}/{total}] {record.status:6s} {record.name}  {shown}  ({how})")

    try:
        result = run_sweep(
            plan, workers=workers, scheduler=scheduler, shared_pass=shared_pass, threads=threads,
            worker_timeout=worker_timeout, on_record=report,
        )
    except KeyboardInterrupt:
        typer.echo(
            f"interrupted: finished trials kept in {plan.out_dir}; run the same command to go on", err=True
        )
        raise typer.Exit(130) from None
    typer.echo("")
    typer.echo(format_table(result))
    summary = best_summary(result)
    if summary is not None:
        typer.echo(f"\n{summary}")
    files = [RESULTS_CSV, RESULTS_JSON] + ([PLOT_FILE] if (plan.out_dir / PLOT_FILE).exists() else [])
    typer.echo(f"results: {', '.join(str(plan.out_dir / f) for f in files)}")
    counts = result.counts()
    if counts["failed"]:
        typer.echo(f"{counts['failed']} of {total} trials failed; see error.txt in their folders", err=True)
        raise typer.Exit(1)
