"""The training loop on tiny synthetic stores: run directory, resume, refusals, schedule."""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import pytest
import torch

from eval.predictions import read_predictions
from shards.device import resolve_device
from shards.errors import CheckpointError, ConfigError, StoreError
from shards.store import open_store
from tests.helpers.fixtures import synthetic_store_fixture
from tests.helpers.synthetic import SyntheticSpec, make_synthetic_store, synthetic_run_config
from train.checkpoint import load_checkpoint, save_checkpoint
from train.config import RunConfig, apply_overrides, get_preset
from train.engine.rng import capture_rng, restore_rng
from train.engine.rundata import epoch_inputs, open_run_data
from train.engine.runlog import RunDirError, read_metrics
from train.engine.schedule import LrSchedule
from train.engine.step import build_state, forward_losses, read_step_values, train_step
from train.engine.trainer import train_run
from train.inference import Grounder
from train.model import R2Tuning

SPEC = SyntheticSpec(n_videos=10, n_heldout=3, clips=16, layers=2, max_len=5, seed=3)
OVERRIDES = [
    "model.dims=32",
    "model.heads=4",
    "batch_size=6",
    "train.pool_size=4",
    "train.num_workers=0",
    "warmup=3",
    "lr=1e-3",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


store = synthetic_store_fixture(SPEC)


def _cfg(epochs: int, *extra: str) -> RunConfig:
    return synthetic_run_config(SPEC, "tacos", [*OVERRIDES, f"epochs={epochs}", *extra])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_run_writes_config_metrics_checkpoints_and_predictions(store, tmp_path):
    cfg = _cfg(2)
    result = train_run(cfg, store, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert RunConfig.from_dict(json.loads((run / "config.json").read_text())).to_dict() == cfg.to_dict()
    records = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        losses = {"loss", "loss_cls", "loss_reg", "loss_sal", "loss_video_cal", "loss_layer_cal"}
        assert set(r["train"]) >= losses
        assert r["samples_per_s"] > 0 and r["lr"] > 0 and "MR-full-R1@0.5" in r["val"]
    assert records[0]["samples"] == 14  # 7 training videos x 2 queries
    best = json.loads((run / "best.json").read_text())
    assert best["key_metric"] == "MR-full-R1@0.5" == result.key_metric
    assert best["value"] == result.best_value == max(r["val"]["MR-full-R1@0.5"] for r in records)
    preds = read_predictions(run / "val_preds.jsonl")
    assert sorted(p.qid for p in preds) == list(range(14, 20))  # the 3 held-out videos
    assert all(p.windows is not None and p.windows.shape[1] == 3 for p in preds)
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
    assert not list(run.glob(".*.tmp"))  # no temporary files left behind
    for name in ("last.pt", "best.pt"):
        payload = torch.load(run / name, map_location="cpu", weights_only=True)
        assert payload["meta"]["store"]["weights_sha256"] == "synthetic-3"
    grounder = Grounder.from_checkpoint(run / "best.pt")
    assert grounder.cfg.model.dims == 32


def test_resume_continues_exactly(store, tmp_path):
    straight = train_run(_cfg(3), store, tmp_path / "a", progress=False)
    train_run(_cfg(1), store, tmp_path / "b", progress=False)
    resumed = train_run(_cfg(3), store, tmp_path / "b", resume=True, progress=False)
    a, b = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    drop = ("samples_per_s", "train_seconds", "val_samples_per_s")
    strip = [{k: v for k, v in r.items() if k not in drop} for r in straight.history]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in resumed.history]
    assert strip[2]["train"]["loss"] != strip[1]["train"]["loss"]  # the epochs really differ


def test_refuses_a_non_empty_run_dir_without_resume(store, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty.*--resume"):
        train_run(_cfg(1), store, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_corrupt_checkpoint_on_resume_is_a_clear_error(store, tmp_path):
    train_run(_cfg(1), store, tmp_path / "run", progress=False)
    last = tmp_path / "run" / "last.pt"
    last.write_bytes(last.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train_run(_cfg(2), store, tmp_path / "run", resume=True, progress=False)


def test_checkpoint_of_another_preset_is_refused(store, tmp_path):
    hd = synthetic_run_config(SPEC, "tvsum_BK", ["model.dims=32", "model.heads=4"])
    run = tmp_path / "run"
    meta = {"train_state": {}, "rng": {}, "store": {}}
    save_checkpoint(run / "last.pt", R2Tuning(hd.model, hd.loss), hd, meta)
    with pytest.raises(CheckpointError, match="preset 'tvsum_BK', not 'tacos'"):
        train_run(_cfg(2), store, run, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="does not fit preset 'tacos'"):
        load_checkpoint(run / "last.pt", cfg=_cfg(2))


def test_resume_with_another_config_is_refused(store, tmp_path):
    train_run(_cfg(1), store, tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match=r"optim.lr=0.001 -> 0.002"):
        train_run(_cfg(2, "lr=2e-3"), store, tmp_path / "run", resume=True, progress=False)


def test_incompatible_store_is_refused(store, tmp_path):
    train_run(_cfg(1), store, tmp_path / "run", progress=False)
    other = tmp_path / "other.zarr"
    make_synthetic_store(other, SyntheticSpec(**{**SPEC.__dict__, "seed": 4}))
    with pytest.raises(StoreError, match="weights_sha256 is 'synthetic-4' in the store but 'synthetic-3'"):
        train_run(_cfg(2), other, tmp_path / "run", resume=True, progress=False)
    wrong_layers = synthetic_run_config(SPEC, "tacos", [*OVERRIDES, "model.layers=3"])
    with pytest.raises(StoreError, match="holds 2 layers but model.layers is 3"):
        train_run(wrong_layers, store, tmp_path / "fresh", progress=False)
    with pytest.raises(StoreError, match="backbone is 'synthetic-tiny' but model.arch is 'ViT-B-32'"):
        train_run(get_preset("tacos"), store, tmp_path / "fresh2", progress=False)


def test_token_dims_come_from_the_store_and_a_mismatch_is_refused(store, tmp_path):
    def unfilled(*extra: str) -> RunConfig:  # backbone unknown to the table, dims left to the store
        base = [f"model.layers={SPEC.layers}", "train.val_split=val", *OVERRIDES, *extra]
        return apply_overrides(get_preset("tacos", arch=SPEC.backbone), base)

    assert unfilled().model.known_token_dims() == (None, None, None)
    run = tmp_path / "run"
    train_run(unfilled("epochs=1"), store, run, progress=False)
    saved = json.loads((run / "config.json").read_text())["model"]
    assert (saved["video_tokens"], saved["video_width"], saved["text_width"]) == (2, 16, 16)
    _, loaded, _ = load_checkpoint(run / "best.pt")
    assert loaded.model.token_dims() == (SPEC.tokens, SPEC.width, SPEC.text_width)
    resumed = train_run(unfilled("epochs=2"), store, run, resume=True, progress=False)
    assert resumed.epochs == 2
    mismatch = r"token dims \(P, C, Cq\) are \(2, 16, 16\) but the config gives \(\?, 32, \?\)"
    with pytest.raises(StoreError, match=mismatch):
        train_run(unfilled("model.video_width=32"), store, tmp_path / "fresh", progress=False)
    with pytest.raises(StoreError, match=r"are \(2, 16, 16\) but the config gives \(50, 768, 512\)"):
        train_run(apply_overrides(_cfg(1), ["model.arch=ViT-B-32", "model.video_tokens=none",
                                            "model.video_width=none", "model.text_width=none"]),
                  store, tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()


def test_train_and_validation_splits_are_config_fields(store, tmp_path):
    run = tmp_path / "run"
    result = train_run(_cfg(1, "train.train_split=val", "train.val_split=train"), store, run, progress=False)
    assert result.history[0]["samples"] == 6  # the 3 held-out videos x 2 queries
    info = json.loads((run / "run.json").read_text())
    assert (info["train_split"], info["val_split"], info["train_queries"]) == ("val", "train", 6)
    assert json.loads((run / "best.json").read_text())["split"] == "train"
    assert sorted(p.qid for p in read_predictions(run / "val_preds.jsonl")) == list(range(14))
    with pytest.raises(ConfigError, match=r"train.val_split is 'test' but the store has no such queries "
                                          r"\(its splits: train, val\)"):
        train_run(_cfg(1, "train.val_split=test"), store, tmp_path / "other", progress=False)
    with pytest.raises(ConfigError, match="no trainable queries in split 'test'"):
        train_run(_cfg(1, "train.train_split=test"), store, tmp_path / "other", progress=False)
    assert not (tmp_path / "other").exists()


def test_schedule_warmup_and_step_decay():
    s = LrSchedule(base_lr=1.0, milestones=(2, 4), gamma=0.1, warmup_iters=10, warmup_ratio=0.001)
    assert s.lr_at(0, 0) == pytest.approx(0.001)
    assert s.lr_at(0, 5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert s.lr_at(3, 9) == pytest.approx(1 - 0.999 * 0.1)  # warm-up overrides the epoch rate
    assert [s.lr_at(e, 100) for e in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cli_trains_and_refuses_to_overwrite(store, tmp_path):
    from typer.testing import CliRunner

    from r2.cli import build_app

    app = build_app()
    args = ["train", "--preset", "tacos", "--store", str(store), "--out", str(tmp_path / "run")]
    args += ["--device", "cpu"]
    fitted = [f"model.arch={SPEC.backbone}", f"model.layers={SPEC.layers}", "train.val_split=val"]
    for item in [*fitted, *OVERRIDES, "epochs=1"]:
        args += ["--set", item]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "1 epochs done" in done.output and (tmp_path / "run" / "best.pt").is_file()
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, RunDirError)
    resumed = CliRunner().invoke(app, [*args, "--resume", "--set", "epochs=2"])
    assert resumed.exit_code == 0, resumed.output
    assert [r["epoch"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_device_resolution_and_amp_only_on_cuda():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device 'tpu0'"):
        resolve_device("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    state = build_state(_cfg(1, "train.amp=true"), "cpu")
    assert state.scaler is None and not state.amp


def test_loader_memory_bound_is_a_config_knob(store):
    from train.data.loader import StreamingLoader
    from train.engine.rundata import token_cache, train_loader

    cfg = _cfg(1, "train.loader_memory_gb=0.5", "train.batching=pooled")
    cache = token_cache(open_store(store), cfg, set(), None, torch.device("cpu"), (1, 1))
    loader = train_loader(store, cache, cfg, "train", keep=set(), pin=False)
    assert isinstance(loader, StreamingLoader) and loader.config.max_bytes == 2**29
    with pytest.raises(ConfigError, match="loader_memory_gb"):
        _cfg(1, "train.loader_memory_gb=0")


class _FakeCuda:
    """``torch.cuda`` generator functions of a machine with ``count`` GPUs whose generator ``i`` holds the
    state ``[i]`` (a set on a missing GPU raises, as torch does)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.restored: list[tuple[int, int]] = []

    def get_rng_state(self, device: int = 0) -> torch.Tensor:
        assert 0 <= device < self.count
        return torch.tensor([device], dtype=torch.uint8)

    def set_rng_state(self, state: torch.Tensor, device: int = 0) -> None:
        if not 0 <= device < self.count:
            raise IndexError(f"no GPU {device} of {self.count}")
        self.restored.append((int(state[0]), device))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> _FakeCuda:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        return self


def test_rng_states_hold_the_training_gpu_only_and_resume_with_fewer_gpus(monkeypatch):
    four = _FakeCuda(4).install(monkeypatch)
    saved = capture_rng("cuda:3")
    assert torch.equal(saved["cuda"], torch.tensor([3], dtype=torch.uint8))  # one state: GPU 3's
    assert capture_rng("cpu")["cuda"] is None and capture_rng("cuda")["cuda"][0] == 0  # bare cuda: current
    one = _FakeCuda(1).install(monkeypatch)  # resumed under CUDA_VISIBLE_DEVICES=3: one GPU, index 0
    restore_rng(saved, "cuda:0")
    assert one.restored == [(3, 0)]
    restore_rng(saved, "cpu")  # a CPU run leaves the CUDA generators alone
    assert one.restored == [(3, 0)] and four.restored == []


def test_rng_states_of_older_checkpoints_restore_one_gpu(monkeypatch):
    old = capture_rng()
    old["cuda"] = [torch.tensor([i], dtype=torch.uint8) for i in range(4)]  # one per GPU visible then
    two = _FakeCuda(2).install(monkeypatch)
    restore_rng(old, "cuda:1")  # the entry of the device's index
    one = _FakeCuda(1).install(monkeypatch)
    restore_rng(old, "cuda:0")
    assert two.restored == [(1, 1)] and one.restored == [(0, 0)]
    six = _FakeCuda(6).install(monkeypatch)
    restore_rng(old, "cuda:5")  # no entry for this index: the first
    restore_rng({**old, "cuda": []}, "cuda:5")  # a CPU run of an older version: nothing to restore
    assert six.restored == [(0, 5)]


@pytest.fixture
def determinism_flags(monkeypatch):
    """Restore the deterministic switches after the test; ``CUBLAS_WORKSPACE_CONFIG`` starts unset."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    algorithms = torch.are_deterministic_algorithms_enabled()
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
    torch.use_deterministic_algorithms(algorithms)


def test_deterministic_sets_the_reference_switches_and_trains(store, determinism_flags):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    build_state(_cfg(1), "cpu")  # by default: the cuDNN switches of the reference (nncore's seeding)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    state = build_state(_cfg(1, "train.deterministic=true"), "cpu")
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    cfg, data = open_run_data(state.cfg, store, "cpu")
    inputs, _ = next(iter(epoch_inputs(data.loader, cfg, data.spec, data.device, 0)))
    values = read_step_values([train_step(state, inputs)])[0]
    assert values["skipped"] == 0.0  # every op of a CPU step has a deterministic kernel


def test_compiled_model_matches_eager_and_saves_the_same_keys(store, tmp_path, monkeypatch):
    # inductor, the default backend, takes over a minute to build this model on a 2-core CPU; aot_eager
    # runs the same graph capture (dynamo) and autograd tracing (AOT) with eager kernels
    aot_eager = functools.partialmethod(torch.nn.Module.compile, backend="aot_eager")
    monkeypatch.setattr(R2Tuning, "compile", aot_eager)
    eager = build_state(_cfg(1), "cpu")
    compiled = build_state(_cfg(1, "train.compile=true"), "cpu")
    assert isinstance(compiled.model, R2Tuning) and compiled.model._compiled_call_impl is not None
    assert eager.model._compiled_call_impl is None
    cfg, data = open_run_data(eager.cfg, store, "cpu")
    inputs, _ = next(iter(epoch_inputs(data.loader, cfg, data.spec, data.device, 0)))
    eager.model.eval()
    compiled.model.eval()
    with torch.no_grad():
        expected, got = forward_losses(eager, inputs), forward_losses(compiled, inputs)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)
    values = read_step_values([train_step(compiled, inputs)])[0]  # forward and backward compiled
    assert all(math.isfinite(v) for v in values.values())
    save_checkpoint(tmp_path / "compiled.pt", compiled.model, compiled.cfg)
    save_checkpoint(tmp_path / "eager.pt", eager.model, eager.cfg)
    keys = _weights(tmp_path / "compiled.pt").keys()
    assert keys == _weights(tmp_path / "eager.pt").keys() and not any("_orig_mod" in k for k in keys)
