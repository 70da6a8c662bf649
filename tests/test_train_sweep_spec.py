"""Sweep specs: --grid / --range / --set parsing, spec files, expansion and seeded random draws."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from shards.errors import R2Error
from train.sweep.spec import SweepSpecError, build_spec, expand, parse_grid, parse_range, split_values
from train.sweep.trials import trial_hash, trial_name


def test_grid_product_order_and_fixed_overrides_stay_out_of_trials():
    grid = ["lr=1e-4,2.5e-4,5e-4", "loss_sal=0.05,0.1"]
    spec = build_spec(preset="charades", grid=grid, fixed=["epochs=2"])
    trials = expand(spec)
    assert len(trials) == 6
    assert trials[0] == {"lr": "1e-4", "loss_sal": "0.05"}
    assert trials[1] == {"lr": "1e-4", "loss_sal": "0.1"}
    assert trials[-1] == {"lr": "5e-4", "loss_sal": "0.1"}
    assert spec.fixed == {"epochs": "2"}
    assert all("epochs" not in t for t in trials)


def test_split_values_keeps_bracketed_lists_whole():
    assert split_values("[1],[1,2], (1,2,4,8)") == ["[1]", "[1,2]", "(1,2,4,8)"]
    assert parse_grid("strides=[1],[1,2]") == ("strides", ["[1]", "[1,2]"])


@pytest.mark.parametrize(
    ("text", "kind", "log", "low", "high"),
    [
        ("lr=1e-5:1e-3:log", "float", True, 1e-5, 1e-3),
        ("model.dropout=0.1:0.5", "float", False, 0.1, 0.5),
        ("epochs=2:9", "int", False, 2, 9),
        ("epochs=2:9:float", "float", False, 2, 9),
        ("batch_size=4:64:log:int", "int", True, 4, 64),
    ],
)
def test_parse_range_kinds(text, kind, log, low, high):
    r = parse_range(text)
    assert (r.kind, r.log, r.low, r.high) == (kind, log, low, high)


def test_random_draws_respect_ranges_and_are_seeded():
    ranges = ["lr=1e-5:1e-3:log", "model.dropout=0.1:0.5", "epochs=2:9", "loss.cls_loss=focal,dynamic_bce"]
    spec = build_spec(preset="tacos", ranges=ranges, n_random=200, seed=3)
    trials = expand(spec)
    assert len(trials) == 200
    lrs = np.array([float(t["lr"]) for t in trials])
    assert lrs.min() >= 1e-5 and lrs.max() <= 1e-3
    # log-uniform: about half of the draws fall below the geometric mean 1e-4 (uniform would give ~9 %)
    assert 0.35 < np.mean(lrs < 1e-4) < 0.65
    drops = np.array([float(t["model.dropout"]) for t in trials])
    assert drops.min() >= 0.1 and drops.max() <= 0.5 and 0.2 < np.mean(drops < 0.3) < 0.8
    epochs = {t["epochs"] for t in trials}
    assert epochs == {str(e) for e in range(2, 10)}
    assert {t["loss.cls_loss"] for t in trials} == {"focal", "dynamic_bce"}
    assert expand(build_spec(preset="tacos", ranges=ranges, n_random=200, seed=3)) == trials
    assert expand(build_spec(preset="tacos", ranges=ranges, n_random=200, seed=4)) != trials


def test_random_combines_with_grid():
    spec = build_spec(preset="tacos", grid=["loss_sal=0.05,0.1"], ranges=["lr=1e-5:1e-3:log"], n_random=3)
    trials = expand(spec)
    assert len(trials) == 6
    assert [t["loss_sal"] for t in trials] == ["0.05", "0.1"] * 3
    assert trials[0]["lr"] == trials[1]["lr"] != trials[2]["lr"]
    assert all(math.isclose(float(t["lr"]), float(f"{float(t['lr']):.4g}")) for t in trials)


def test_json_and_toml_spec_files_and_command_line_wins(tmp_path):
    data = {
        "preset": "charades", "store": "s.zarr", "seed": 5, "set": {"epochs": 2, "amp": False},
        "grid": {"lr": [1e-4, 2.5e-4], "loss_sal": "0.05,0.1"},
        "random": {"n": 2, "ranges": {"model.dropout": "0.1:0.5",
                                      "wd": {"low": 1e-5, "high": 1e-3, "log": True}, "seed": [1, 2]}},
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(data))
    spec = build_spec(spec_file=path)
    assert spec.fixed == {"epochs": "2", "amp": "false"}
    assert spec.grid == {"lr": ["0.0001", "0.00025"], "loss_sal": ["0.05", "0.1"]}
    assert spec.ranges["wd"].log and spec.ranges["seed"].choices == ("1", "2")
    assert len(expand(spec)) == 8
    toml = tmp_path / "sweep.toml"
    toml.write_text('preset = "tacos"\n[grid]\nlr = [1e-4, 5e-4]\n[random]\nn = 2\n'
                    '[random.ranges]\n"model.dropout" = "0.1:0.5"\n')
    merged = build_spec(spec_file=toml, preset="charades", grid=["lr=1e-3"], fixed=["epochs=1"], seed=9)
    assert merged.preset == "charades" and merged.grid == {"lr": ["1e-3"]} and merged.seed == 9
    assert len(expand(merged)) == 2


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"grid": ["lr"]}, "KEY=VALUE"),
        ({"grid": ["lr=1e-4,1e-4"]}, "twice"),
        ({"ranges": ["lr=1e-3:1e-5"], "n_random": 2}, "above"),
        ({"ranges": ["lr=0:1e-3:log"], "n_random": 2}, "> 0"),
        ({"ranges": ["lr=1e-5:1e-3:cubic"], "n_random": 2}, "modifier"),
        ({"ranges": ["lr=1e-5:1e-3"]}, "--random"),
        ({"n_random": 3, "grid": ["lr=1e-4"]}, "--range"),
        ({}, "nothing to sweep"),
        ({"grid": ["lr=1e-4"], "fixed": ["lr=1e-3"]}, "--set"),
    ],
)
def test_bad_specs_raise_one_clear_user_error(kwargs, needle):
    with pytest.raises(SweepSpecError, match=needle) as info:
        build_spec(preset="tacos", **kwargs)
    assert isinstance(info.value, R2Error)


def test_bad_spec_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(SweepSpecError, match="not valid JSON"):
        build_spec(spec_file=bad)
    extra = tmp_path / "extra.json"
    extra.write_text('{"preset": "tacos", "grids": {}}')
    with pytest.raises(SweepSpecError, match="unknown key"):
        build_spec(spec_file=extra)
    with pytest.raises(SweepSpecError, match="not found"):
        build_spec(spec_file=tmp_path / "missing.json")


def test_trial_names_are_safe_deterministic_and_hash_all_overrides():
    digest = trial_hash("charades", {"epochs": "2", "lr": "1e-4"})
    assert digest == trial_hash("charades", {"lr": "1e-4", "epochs": "2"})
    assert digest != trial_hash("charades", {"epochs": "3", "lr": "1e-4"})
    assert digest != trial_hash("tacos", {"epochs": "2", "lr": "1e-4"})
    name = trial_name(3, {"lr": "1e-4", "model.strides": "[1, 2]", "x": "a/b"}, digest)
    assert name == f"trial-003_lr=1e-4_model.strides=_1_2__x=a_b-{digest}"
    assert len(trial_name(0, {"k": "v" * 500}, digest)) < 100
