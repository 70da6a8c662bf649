"""Multi-seed sweeps: --seeds N, configurations over seeds, mean ± std / n, ranking by the mean, the CLI."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shards.datasets import get_dataset
from tests.helpers.fixtures import synthetic_store_fixture
from tests.helpers.synthetic import SyntheticSpec
from train.config import get_preset
from train.sweep.config import request_config
from train.sweep.results import best_command, best_summary, format_table, plot_sweep
from train.sweep.runner import plan_sweep, run_sweep
from train.sweep.shared import data_key
from train.sweep.spec import SweepSpecError, build_spec, expand
from train.sweep.trials import TrialRequest

KEY = "score"
SCORES: dict[tuple[str, str], float | str] = {  # (lr, seed) -> score; "fail" raises
    ("1e-3", "42"): 10.0, ("1e-3", "43"): 12.0, ("1e-3", "44"): 14.0,      # mean 12, std 2
    ("1e-4", "42"): 0.0, ("1e-4", "43"): 0.0, ("1e-4", "44"): 30.0,        # mean 10, best single seed
    ("1e-5", "42"): 5.0, ("1e-5", "43"): "fail", ("1e-5", "44"): 9.0,      # mean 7 over n=2, 1 failed
}


def toy_trial(request: TrialRequest) -> dict[str, float]:
    value = SCORES[(request.params["lr"], request.params["seed"])]
    if value == "fail":
        raise ValueError("diverged")
    return {KEY: float(value), "other": float(value) / 10}


def _plan(tmp_path: Path, **kwargs):
    store = tmp_path / "store.zarr"
    store.mkdir(exist_ok=True)
    spec = build_spec(preset="tacos", store=str(store), **kwargs)
    return plan_sweep(spec, tmp_path / "sweep", key_metric=KEY)


def test_seeds_expand_every_configuration_and_compose_with_grid_random_and_files(tmp_path):
    base = get_preset("tacos").train.seed
    spec = build_spec(preset="tacos", grid=["lr=1e-4,1e-3"], seeds=3)
    assert expand(spec) == [{"lr": lr, "seed": str(base + i)} for lr in ("1e-4", "1e-3") for i in range(3)]
    assert spec.seeded() and spec.config_keys() == ["lr"]

    given = build_spec(preset="tacos", grid=["lr=1e-4"], fixed=["seed=7", "epochs=2"], seeds=2)
    assert [t["seed"] for t in expand(given)] == ["7", "8"] and given.fixed == {"epochs": "2"}

    drawn = expand(build_spec(preset="tacos", ranges=["lr=1e-5:1e-3:log"], n_random=2, seeds=2))
    assert [t["seed"] for t in drawn] == [str(base), str(base + 1)] * 2
    assert drawn[0]["lr"] == drawn[1]["lr"] != drawn[2]["lr"]

    assert expand(build_spec(preset="tacos", seeds=3)) == [{"seed": str(base + i)} for i in range(3)]

    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"preset": "tacos", "seeds": 3, "grid": {"lr": [1e-4, 1e-3]}}))
    assert len(expand(build_spec(spec_file=path))) == 6
    assert len(expand(build_spec(spec_file=path, seeds=2))) == 4

    assert build_spec(preset="tacos", grid=["seed=1,2,3"]).seeded()
    assert build_spec(preset="tacos", grid=["lr=1,2", "train.seed=1,2"]).config_keys() == ["lr"]
    assert not build_spec(preset="tacos", grid=["lr=1,2"], fixed=["seed=3"]).seeded()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"grid": ["seed=1,2"], "seeds": 3}, "keep one"),
        ({"grid": ["lr=1"], "seeds": -1}, ">= 1"),
        ({"grid": ["lr=1"], "seeds": 2, "fixed": ["seed=abc"]}, "whole number"),
        ({"seeds": 2, "fixed": ["seed=1", "train.seed=2"]}, "twice"),
    ],
)
def test_bad_seed_options_are_user_errors(kwargs, needle):
    with pytest.raises(SweepSpecError, match=needle):
        build_spec(preset="tacos", **kwargs)


def test_a_seed_list_in_a_spec_file_points_to_the_grid(tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"preset": "tacos", "seeds": [1, 2]}))
    with pytest.raises(SweepSpecError, match='"grid": {"seed"'):
        build_spec(spec_file=path)


def test_configurations_report_mean_std_n_and_rank_by_the_mean(tmp_path):
    plan = _plan(tmp_path, grid=["lr=1e-3,1e-4,1e-5"], seeds=3)
    result = run_sweep(plan, trial_fn=toy_trial, workers=0)
    ranked = result.ranked_configurations()
    assert [c.params for c in ranked] == [{"lr": "1e-3"}, {"lr": "1e-4"}, {"lr": "1e-5"}]
    top, single_best, with_failure = (c.stats(KEY) for c in ranked)
    assert (top.mean, top.std, top.n) == (12.0, 2.0, 3)
    assert single_best.mean == 10.0 and single_best.std == pytest.approx(statistics.stdev([0, 0, 30]))
    assert (with_failure.mean, with_failure.n, ranked[2].count("failed")) == (7.0, 2, 1)
    assert with_failure.std == pytest.approx(math.sqrt(8))
    assert ranked[2].seeds() == ["42", "44"]
    assert result.best() == ranked[0]          # the config of the best single seed (30) is not the best
    assert [r.params["lr"] for r in result.ranked()][:3] == ["1e-3"] * 3
    assert result.counts()["failed"] == 1

    table = format_table(result).splitlines()
    assert table[0].split()[:6] == ["rank", "config", KEY, "mean", "±", "std"]
    assert "seed" not in table[0]
    assert re.match(r"1\s+000\s+12\.00 ± 2\.000?\s+3\s+1e-3\s+3 ok", table[1]), table[1]
    assert re.match(r"3\s+002\s+7\.000 ± 2\.828\s+2\s+1e-5\s+2 ok, 1 failed: ValueError: diverged", table[3])

    command = best_command(result)
    assert command.endswith("--set lr=1e-3") and "seed" not in command
    summary = best_summary(result)
    assert summary.startswith("best: configuration 000: lr=1e-3")
    assert "12.00 ± 2.00 (mean ± std over n=3 seeds: 42, 43, 44)" in summary


def test_results_files_hold_the_statistics_per_configuration(tmp_path):
    plan = _plan(tmp_path, grid=["lr=1e-3,1e-4,1e-5"], seeds=3)
    run_sweep(plan, trial_fn=toy_trial, workers=0)
    rows = list(csv.DictReader((plan.out_dir / "results.csv").open()))
    assert [r["lr"] for r in rows] == ["1e-3", "1e-4", "1e-5"]
    assert (rows[0]["n"], rows[0]["failed"], rows[0]["seeds"]) == ("3", "0", "42 43 44")
    assert float(rows[0][f"{KEY}_mean"]) == 12.0 and float(rows[0][f"{KEY}_std"]) == 2.0
    assert float(rows[0]["other_mean"]) == pytest.approx(1.2)
    assert (rows[2]["n"], rows[2]["failed"], rows[2]["seeds"]) == ("2", "1", "42 44")
    assert "diverged" in rows[2]["error"] and "seed" not in rows[0]

    saved = json.loads((plan.out_dir / "results.json").read_text())
    assert saved["seeded"] is True
    first = saved["configurations"][0]
    assert first["params"] == {"lr": "1e-3"} and first["n"] == 3
    assert first["metrics"][KEY] == {"mean": 12.0, "std": 2.0, "n": 3, "values": [10.0, 12.0, 14.0]}
    assert saved["best"]["params"] == {"lr": "1e-3"} and "seed" not in saved["best"]["command"]
    assert [(t["rank"], t["config"]) for t in saved["trials"]][:4] == [(1, 0)] * 3 + [(2, 1)]
    assert (plan.out_dir / "sweep.png").stat().st_size > 5000


def test_one_seed_gives_a_blank_std_and_seed_only_sweeps_work(tmp_path):
    plan = _plan(tmp_path, grid=["lr=1e-3,1e-4"], fixed=["seed=44"], seeds=1)
    run_sweep(plan, trial_fn=toy_trial, workers=0)
    rows = list(csv.DictReader((plan.out_dir / "results.csv").open()))
    assert [(r["lr"], r["n"], r[f"{KEY}_mean"], r[f"{KEY}_std"]) for r in rows] == [
        ("1e-4", "1", "30.0", ""), ("1e-3", "1", "14.0", "")]
    saved = json.loads((plan.out_dir / "results.json").read_text())
    assert saved["configurations"][0]["metrics"][KEY]["std"] is None

    def constant(request: TrialRequest) -> dict[str, float]:
        return {KEY: float(request.params["seed"])}

    spec = build_spec(preset="tacos", store=plan.store, seeds=3)
    only = plan_sweep(spec, tmp_path / "only", key_metric=KEY)
    result = run_sweep(only, trial_fn=constant, workers=0)
    (config,) = result.configurations()
    assert config.params == {} and config.stats(KEY).mean == 43.0
    assert "(fixed settings only)" in best_summary(result)
    assert (only.out_dir / "sweep.png").is_file()


def test_names_hashes_and_resume_with_more_seeds_or_the_same_seeds_as_a_grid(tmp_path):
    plan = _plan(tmp_path, grid=["lr=1e-3,1e-4"], seeds=2)
    assert [re.sub(r"-[0-9a-f]{8}$", "", r.name) for r in plan.requests] == [
        "trial-000_lr=1e-3_seed=42", "trial-001_lr=1e-3_seed=43", "trial-002_lr=1e-4_seed=42",
        "trial-003_lr=1e-4_seed=43"]
    run_sweep(plan, trial_fn=toy_trial, workers=0)

    more = run_sweep(_plan(tmp_path, grid=["lr=1e-3,1e-4"], seeds=3), trial_fn=toy_trial, workers=0)
    assert [r.reused for r in more.records] == [True, True, False, True, True, False]

    grid = ["lr=1e-3,1e-4", "seed=42,43,44"]
    as_grid = run_sweep(_plan(tmp_path, grid=grid), trial_fn=toy_trial, workers=0)
    assert all(r.reused for r in as_grid.records)
    assert as_grid.seeded and [c.stats(KEY).n for c in as_grid.ranked_configurations()] == [3, 3]


def test_one_trial_per_configuration_keeps_the_trial_view(tmp_path):
    plan = _plan(tmp_path, grid=["lr=1e-3,1e-4"], fixed=["seed=44"])
    result = run_sweep(plan, trial_fn=lambda r: {KEY: SCORES[(r.params["lr"], "44")]}, workers=0)
    header = format_table(result).splitlines()[0].split()
    assert header == ["rank", "trial", KEY, "lr", "status", "seconds"]
    assert best_summary(result).startswith(f"best: {result.ranked()[0].name}\n")
    rows = list(csv.DictReader((plan.out_dir / "results.csv").open()))
    assert rows[0]["name"] == result.ranked()[0].name and float(rows[0][KEY]) == 30.0
    assert json.loads((plan.out_dir / "results.json").read_text())["seeded"] is False


# held out as `test`, the split the tacos preset validates on
store = synthetic_store_fixture(
    SyntheticSpec(n_videos=6, n_heldout=2, clips=16, dataset="tacos", heldout_split="test")
)


TINY = ["batch_size=4", "model.dims=32", "model.heads=4", "model.layers=2", "warmup=0", "epochs=1"]


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_three_seed_sweep_prints_mean_std_and_keeps_seeds_out_of_shared_passes(store, tmp_path):
    from r2.cli import build_app

    out = tmp_path / "sweep"
    fixed = [a for item in TINY for a in ("--set", item)]
    args = ["sweep", "--preset", "tacos", "--store", store, "--out", str(out), "--workers", "0",
            "--shared-pass", "on", "--grid", "lr=1e-3,3e-3", "--seeds", "3", *fixed]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    key = get_dataset("tacos").key_metric
    assert "6 trials (3 seeds per configuration)" in result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    assert f"{key} mean ± std" in lines[header]
    assert lines[header].split()[-4:] == ["n", "lr", "status", "seconds"]
    rows = lines[header + 1: header + 3]
    assert all(re.search(r"\d ± \d", row) and row.split()[5] == "3" and "3 ok" in row for row in rows), rows
    assert "mean ± std over n=3 seeds: 42, 43, 44" in result.output

    saved = json.loads((out / "results.json").read_text())
    assert [t["shared"] for t in saved["trials"]] == [2] * 6     # pairs of lrs per seed, never across seeds
    for config in saved["configurations"]:
        assert config["metrics"][key]["n"] == 3
        miou = config["metrics"]["MR-full-mIoU"]
        assert len(set(miou["values"])) > 1                  # the seeds really train different models
        assert miou["mean"] == pytest.approx(statistics.fmean(miou["values"]))
        assert miou["std"] == pytest.approx(statistics.stdev(miou["values"]))
    requests = plan_sweep(build_spec(preset="tacos", store=store, grid=["lr=1e-3"], seeds=2, fixed=TINY),
                          tmp_path / "x").requests
    assert data_key(request_config(requests[0])) != data_key(request_config(requests[1]))


def test_epoch_counts_are_integers_in_the_csv_and_an_all_zero_plot_stays_above_zero(tmp_path):
    plan = _plan(tmp_path, grid=["lr=1e-3,1e-4"], fixed=["seed=42"])
    result = run_sweep(
        plan, trial_fn=lambda r: {KEY: 0.0, "best_epoch": 3.0, "epochs": 5.0}, workers=0
    )
    rows = list(csv.DictReader((plan.out_dir / "results.csv").open()))
    assert [(row["best_epoch"], row["epochs"], row[KEY]) for row in rows] == [("3", "5", "0.0")] * 2
    from matplotlib.figure import Figure

    drawn: list[tuple[float, float]] = []
    original = Figure.savefig

    def keep_limits(fig, *args, **kwargs):
        drawn.extend(ax.get_ylim() for ax in fig.axes)
        return original(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", keep_limits)
        plot_sweep(result, tmp_path / "sweep.png")
    assert drawn and all(bottom >= 0.0 and top > bottom for bottom, top in drawn)
