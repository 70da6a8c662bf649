"""Hyper-parameter sweeps: spec, trials, runner on dask, results, the shared data pass and the CLI."""
