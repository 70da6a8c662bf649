"""Which GPU each sweep worker trains on, the memory share of a shared pass, the current CUDA device of
trials and training runs, and the one up-front error for a device that does not exist: on the CPU, with
the GPU count and torch.cuda mocked (tests/test_cuda_devices.py runs the real thing)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from shards import device as devices
from shards.device import gpu_sharers, trial_gpus, use_device, worker_device
from shards.errors import ConfigError
from tests.helpers.synthetic import SyntheticSpec, make_synthetic_store, synthetic_run_config
from train.engine import trainer
from train.sweep import runner, shared
from train.sweep.runner import default_workers, plan_sweep, run_sweep, run_task
from train.sweep.spec import build_spec
from train.sweep.trials import TrialRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_an_explicit_index_is_one_gpu_and_cuda_spreads_over_all():
    assert trial_gpus("cpu", 4) == [] and trial_gpus("auto", 0) == []
    assert trial_gpus("cuda:2", 4) == [2]
    assert trial_gpus("cuda", 4) == trial_gpus("auto", 4) == [0, 1, 2, 3]
    assert [worker_device("cuda:2", 4, w) for w in range(3)] == ["cuda:2"] * 3
    assert [worker_device("cuda", 4, w) for w in range(6)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3",
                                                               "cuda:0", "cuda:1"]
    assert worker_device("auto", 2, 3) == "cuda:1"
    assert worker_device("cuda", 1, 5) == "cuda:0"
    assert worker_device("cpu", 4, 1) == "cpu" and worker_device("auto", 0, 1) == "auto"
    assert worker_device("cuda", 4, "tcp://10.0.0.2:4000") == "cuda"   # an external cluster's worker
    assert worker_device("cuda", 4, None) == "cuda"
    assert [gpu_sharers(w, g) for w, g in [(1, 1), (4, 1), (4, 4), (5, 4), (2, 0)]] == [1, 4, 1, 2, 2]


def test_default_workers_are_one_per_gpu_the_trials_use(monkeypatch):
    monkeypatch.setattr(runner, "visible_gpus", lambda: 4)
    assert default_workers(10, "cuda:1") == 1
    assert default_workers(10, "cuda") == default_workers(10, "auto") == 4
    assert default_workers(3, "cuda") == 3
    monkeypatch.setattr(runner, "visible_gpus", lambda: 0)
    assert default_workers(10, "auto") == min(10, runner.usable_cores())


@pytest.fixture
def fake_gpus(monkeypatch):
    """Four visible GPUs (free memory 8, 6, 8, 8 GB), the current device 0; records set_device calls."""
    calls: list[int] = []
    free = {0: 8e9, 1: 6e9, 2: 8e9, 3: 8e9}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[torch.device(d).index], 9e9))
    return calls


def test_shared_pass_budget_is_a_share_of_its_gpu(fake_gpus):
    share = shared.MEMORY_FRACTION
    assert shared.memory_budget("cuda:1", 1) == int(share * 6e9)
    assert shared.memory_budget("cuda:2", 2) == int(share * 8e9 / 2)      # two workers on GPU 2
    assert shared.memory_budget("cuda", 4) == int(share * 6e9)           # one worker per GPU, least free
    assert shared.memory_budget("cuda", 8) == int(share * 6e9 / 2)


def test_use_device_makes_the_gpu_current_and_leaves_the_cpu_alone(fake_gpus):
    assert use_device("cuda:2") == torch.device("cuda", 2) and fake_gpus == [2]
    assert use_device("cuda") == torch.device("cuda", 0) and fake_gpus == [2, 0]
    assert use_device("cpu") == torch.device("cpu") and fake_gpus == [2, 0]
    with pytest.raises(ConfigError, match=r"'cuda:4'.*only 4 CUDA devices are visible"):
        use_device("cuda:4")


def _request(tmp_path: Path, device: str) -> TrialRequest:
    return TrialRequest(0, "t0", str(tmp_path / "t0"), "charades", str(tmp_path), {}, {}, device=device)


@pytest.mark.parametrize(("device", "worker", "expected", "current"), [
    ("cuda", 3, "cuda:3", [3]),
    ("cuda", 5, "cuda:1", [1]),
    ("cuda:2", 0, "cuda:2", [2]),
    ("cpu", 1, "cpu", []),
])
def test_a_trial_runs_on_its_workers_gpu_made_current(fake_gpus, monkeypatch, tmp_path, device, worker,
                                                      expected, current):
    import distributed

    monkeypatch.setattr(distributed, "get_worker", lambda: SimpleNamespace(name=worker))
    seen: list[str] = []

    def trial(request: TrialRequest) -> dict[str, float]:
        seen.append(request.device)
        return {"score": 1.0}

    records = run_task([_request(tmp_path, device)], trial)
    assert [r.status for r in records] == ["ok"], records[0].error
    assert seen == [expected] and fake_gpus == current


def test_train_run_makes_its_device_current(tmp_path, monkeypatch):
    spec = SyntheticSpec(n_videos=3, clips=12, layers=2, queries_per_video=1)
    make_synthetic_store(tmp_path / "s.zarr", spec)
    cfg = synthetic_run_config(spec, "tacos", ["epochs=1", "batch_size=2", "model.dims=32", "model.heads=4"])
    asked: list[str] = []

    def on_the_cpu(name: str) -> torch.device:
        asked.append(name)
        return torch.device("cpu")

    monkeypatch.setattr(trainer, "use_device", on_the_cpu)
    result = trainer.train_run(cfg, tmp_path / "s.zarr", tmp_path / "run", device="cuda:1", progress=False)
    assert asked == ["cuda:1"] and result.epochs == 1


def _plan(tmp_path: Path, device: str):
    store = tmp_path / "store.zarr"
    store.mkdir(exist_ok=True)
    spec = build_spec(preset="charades", store=str(store), grid=["lr=1e-3,1e-4"])
    return plan_sweep(spec, tmp_path / "sweep", device=device, key_metric="score")


def _never(request: TrialRequest) -> dict[str, float]:
    raise AssertionError("no trial may start")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_missing_gpu_is_one_error_before_any_trial(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device 'cuda' asked for but CUDA is not available here"):
        run_sweep(_plan(tmp_path, "cuda"), trial_fn=_never, workers=workers)
    assert not (tmp_path / "sweep").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"'cuda:2'.*only 2 CUDA devices.*cuda:0 to cuda:1"):
        run_sweep(_plan(tmp_path, "cuda:2"), trial_fn=_never, workers=workers)
    assert not (tmp_path / "sweep").exists()


def test_sweep_command_without_cuda_fails_once_before_planning(tmp_path, monkeypatch):
    from r2.cli import build_app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    store = tmp_path / "store.zarr"
    store.mkdir()
    args = ["sweep", "--preset", "charades", "--store", str(store), "--grid", "lr=1e-3,1e-4",
            "--device", "cuda", "--out", str(tmp_path / "sweep")]
    result = CliRunner().invoke(build_app(), args)
    assert isinstance(result.exception, ConfigError) and "use --device cpu" in str(result.exception)
    assert "sweep of" not in result.output and not (tmp_path / "sweep").exists()


def test_train_command_without_cuda_is_the_same_one_error(tmp_path, monkeypatch):
    from r2.cli import build_app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.visible_gpus() == 0
    make_synthetic_store(tmp_path / "s.zarr", SyntheticSpec(n_videos=2, clips=12, queries_per_video=1))
    args = ["train", "--preset", "tacos", "--store", str(tmp_path / "s.zarr"), "--arch", "synthetic-tiny",
            "--set", "model.layers=2", "--device", "cuda:0", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(build_app(), args)
    assert isinstance(result.exception, ConfigError), result.output
    message = "device 'cuda:0' asked for but CUDA is not available here; use --device cpu"
    assert str(result.exception) == message
    assert not (tmp_path / "run").exists()
