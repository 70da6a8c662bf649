"""``r2 sweep``: a hyper-parameter sweep over a feature store (grid, random search or a spec file).

Thin layer over :mod:`train.sweep`: parse options, run the trials (a progress line per finished trial
on stderr with the counts and an ETA, :mod:`train.sweep.progress`), print the ranked table (mean ± std
over seeds per configuration with ``--seeds N``) and the best configuration's ``r2 train`` command.
The sweep folder defaults to ``runs/<preset>-sweep`` (:func:`train.sweep.runner.default_out`).

Exit status:

- 0: every trial finished;
- 1: some trials failed (their errors are in the table and in each trial's ``error.txt``);
- 2: a user error (one ``error: ...`` line, before any trial runs);
- 130: interrupted by Ctrl-C (SIGINT);
- 143: terminated by SIGTERM (what batch schedulers send on pre-emption), handled exactly like Ctrl-C.

Interrupted or terminated, the running trials are stopped, ``results.csv`` / ``results.json`` /
``sweep.png`` are written for the trials that finished, and one line says how many finished; running the
same command again reuses them and runs the rest.
"""

from __future__ import annotations

from pathlib import Path

import typer

from shards.cliutil import interrupt_exit_code, interrupt_name, sigterm_as_interrupt
from shards.cluster import DEFAULT_WORKER_TIMEOUT, check_worker_timeout
from train.sweep.results import PLOT_FILE, RESULTS_CSV, RESULTS_JSON, best_summary, format_table, read_counts
from train.sweep.runner import SHARED_PASS_MODES, SweepError, check_device, plan_sweep, run_sweep
from train.sweep.spec import build_spec


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
    out: Path | None = typer.Option(None, "--out", help="Sweep folder (default: runs/PRESET-sweep)."),
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
    try:
        with sigterm_as_interrupt():
            result = run_sweep(
                plan, workers=workers, scheduler=scheduler, shared_pass=shared_pass, threads=threads,
                worker_timeout=worker_timeout,
            )
    except KeyboardInterrupt as err:
        counts = read_counts(plan.out_dir)
        failed = f", {counts['failed']} failed" if counts.get("failed") else ""
        typer.echo(f"{interrupt_name(err)}: {counts.get('ok', 0)} of {total} trials finished{failed}, "
                   f"results in {plan.out_dir}; re-run the same command to continue", err=True)
        raise typer.Exit(interrupt_exit_code(err)) from None
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
