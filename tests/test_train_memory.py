"""Memory you can plan: the step estimate against the real peak of live tensors on the CPU, the
dry-run print-out, and the refusal / warning before a run starts (train/engine/memory.py)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from typer.testing import CliRunner

from shards.datasets import get_dataset
from shards.errors import ConfigError
from shards.store import open_store
from tests.helpers.synthetic import SyntheticSpec, make_synthetic_store, synthetic_run_config
from train.config import apply_overrides, get_preset
from train.data.batching import model_inputs
from train.data.loader import LoaderConfig, StreamingLoader
from train.engine import memory
from train.engine.memory import GIB, check_step_memory, estimate_step, fitting_batch, store_extent
from train.engine.step import build_state, train_step
from train.engine.trainer import train_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOW, HIGH = 0.9, 1.3
"""The estimate stays within this factor of the measured peak (it counts LayerNorm's internal copy of
its strided input in the backward, which the CPU trace below does not see)."""


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of the tensor storages alive after any operation that ran under this mode (every
    tensor made under it is followed until it is freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def reset(self) -> None:
        """Start a new peak at the bytes alive now."""
        self.peak = self.current()

    def current(self) -> int:
        self.live = {key: ref for key, ref in self.live.items() if not ref[0].expired()}
        return sum(size for _, size in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live or self.live[key][0].expired():
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, self.current())
        return out


SHAPES = {
    # name: (store spec, overrides); each shape has a different biggest item
    "token maps": (SyntheticSpec(n_videos=4, clips=24, layers=2, tokens=40, width=48, text_width=16,
                                 queries_per_video=2), ["model.dims=32", "batch_size=8"]),
    "temporal decoder (attention T x T)": (
        SyntheticSpec(n_videos=2, clips=160, layers=2, tokens=2, width=16, queries_per_video=2),
        ["model.dims=32", "batch_size=4"],
    ),
    "weights, grads, AdamW": (
        SyntheticSpec(n_videos=2, clips=16, layers=3, tokens=2, width=16, text_width=16, queries_per_video=2),
        ["model.dims=128", "batch_size=4"],
    ),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_estimate_is_close_to_the_peak_of_live_tensors_of_real_steps(shape, tmp_path):
    """The real path: a loader batch, its float32 model inputs and two optimizer steps (the second one
    holds the AdamW moments), traced on the CPU; the estimate for the batch's T and L is within
    [LOW, HIGH] of the peak."""
    spec, overrides = SHAPES[shape]
    store = tmp_path / "s.zarr"
    make_synthetic_store(store, spec)
    cfg = synthetic_run_config(spec, "tacos", ["model.heads=4", *overrides])
    config = LoaderConfig(batch_size=cfg.train.batch_size, videos_per_batch=spec.n_videos)
    batch = next(iter(StreamingLoader(store, config)))
    with LiveTensorPeak() as trace:
        state = build_state(cfg, "cpu")
        inputs = model_inputs(batch, get_dataset("tacos"), cfg.model.layers, state.device,
                              torch.Generator().manual_seed(0))
        train_step(state, inputs)
        trace.reset()
        train_step(state, inputs)
    estimate = estimate_step(cfg, inputs.video.size(1), inputs.query.size(1), device_type="cpu")
    assert len(inputs) == cfg.train.batch_size
    assert estimate.items[0].name.startswith(shape.split(" (")[0]), estimate.items
    assert LOW * trace.peak <= estimate.total <= HIGH * trace.peak, (estimate.total, trace.peak)


def test_amp_and_the_gpu_change_what_is_kept():
    """On CUDA with AMP the Linear inputs are float16 casts and the loader batch sits on the GPU;
    without AMP (or on the CPU) activations are float32."""
    cfg = get_preset("qvhighlights")
    amp = estimate_step(cfg, 75, 32, device_type="cuda")
    fp32 = estimate_step(apply_overrides(get_preset("qvhighlights"), ["amp=false"]), 75, 32)
    cpu = estimate_step(cfg, 75, 32, device_type="cpu")
    names = {i.name: i.nbytes for i in amp.items}
    b, t, k, (p, c, _) = 128, 75, 4, cfg.model.token_dims()
    assert names["video batch fp32 (B, T, k, P, C)"] >= 4 * b * t * k * p * c
    assert names["TEF concat fp32 (B, T, k, P, C')"] == 4 * b * t * k * p * (c + 2)
    cq = cfg.model.token_dims()[2]
    batch = 2 * b * t * k * p * c + 2 * b * 32 * k * cq
    assert names["loader batch fp16 (B, T, k, P, C)"] == batch
    assert names["next loader batch fp16, prefetched (side stream)"] == batch  # its fp32 copy comes later
    assert estimate_step(cfg, 75, 32, prefetch=False).total == amp.total - batch
    assert amp.amp and not fp32.amp and not cpu.amp
    assert amp.total < fp32.total and "loader batch" not in " ".join(i.name for i in cpu.items)
    bigger = estimate_step(get_preset("qvhighlights", arch="ViT-L-14"), 75, 32)
    assert bigger.total > 4 * amp.total           # P 50 -> 257, C 768 -> 1024


def test_fitting_batch_is_the_largest_that_fits():
    cfg = get_preset("qvhighlights", arch="ViT-L-14")
    room = 70 * GIB
    fit = fitting_batch(cfg, room, 75, 32)

    def total(n: int) -> int:
        sized = apply_overrides(get_preset("qvhighlights", arch="ViT-L-14"), [f"batch_size={n}"])
        return estimate_step(sized, 75, 32).total

    assert 1 <= fit < cfg.train.batch_size
    assert total(fit) <= room < total(fit + 1)


def _store(tmp_path: Path) -> Path:
    path = tmp_path / "s.zarr"
    make_synthetic_store(path, SyntheticSpec(n_videos=3, clips=20, layers=2, queries_per_video=1))
    return path


def test_check_refuses_on_a_gpu_without_room_and_names_the_knobs(tmp_path, caplog):
    store = open_store(_store(tmp_path))
    extent = store_extent(store)
    cfg = synthetic_run_config(SyntheticSpec(n_videos=3, layers=2), "tacos", ["batch_size=64"])
    gpu = torch.device("cuda", 1)
    need = estimate_step(cfg, *extent, device_type="cuda").total
    with pytest.raises(ConfigError) as refused:
        check_step_memory(cfg, extent, gpu, free=need // 2)
    text = str(refused.value)
    assert "GPU cuda:1" in text and f"{need / GIB:.2f} GiB" in text
    assert f"{need // 2 / GIB:.2f} GiB free" in text
    assert "model.layers" in text and "smaller backbone (e.g. ViT-B-32)" in text
    fit = int(re.search(r"--set batch_size=(\d+) fits", text).group(1))
    smaller = apply_overrides(synthetic_run_config(SyntheticSpec(n_videos=3, layers=2), "tacos"),
                              [f"batch_size={fit}"])
    assert 0 < fit < 64
    assert estimate_step(smaller, *extent).total <= 0.9 * (need // 2)
    with caplog.at_level(logging.WARNING, logger="train.engine.memory"):
        check_step_memory(cfg, extent, gpu, free=int(need / 0.95))                  # close: warned
        assert "may run out of memory" in caplog.text
        caplog.clear()
        check_step_memory(cfg, extent, gpu, free=2 * need)                      # room: silent
        cpu, ram = torch.device("cpu"), estimate_step(cfg, *extent, device_type="cpu").total
        check_step_memory(cfg, extent, cpu, free=int(ram / 0.95))               # CPU, close: silent
        assert caplog.text == ""
        check_step_memory(cfg, extent, cpu, free=ram // 3)                      # CPU: warned only
        assert "host RAM" in caplog.text


def test_train_run_checks_the_step_before_training(tmp_path, caplog, monkeypatch):
    path = _store(tmp_path)
    cfg = synthetic_run_config(SyntheticSpec(n_videos=3, layers=2), "tacos",
                               ["epochs=1", "batch_size=2", "model.dims=32", "model.heads=4", "warmup=1"])
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1000)
    with caplog.at_level(logging.WARNING, logger="train.engine.memory"):
        result = train_run(cfg, path, tmp_path / "run", device="cpu", progress=False)
    assert result.epochs == 1
    assert "one training step of tacos" in caplog.text and "host RAM has 0.00 GiB free" in caplog.text


def _dry_run(*args: str) -> tuple[str, float]:
    from r2.cli import build_app

    result = CliRunner().invoke(build_app(), ["train", "--dry-run", *args])
    assert result.exit_code == 0, result.output
    total = re.search(r"one training step on the GPU with AMP \(fp16\): ([\d.]+) GiB", result.output)
    assert total, result.output
    return result.output, float(total.group(1))


def test_dry_run_prints_the_estimate_for_the_preset_backbone_batch_and_length(tmp_path):
    out, total = _dry_run("--preset", "qvhighlights")
    assert total == pytest.approx(estimate_step(get_preset("qvhighlights"), 75).total / GIB, abs=0.01)
    assert "128 queries x 75 clips (the typical longest QVHighlights video" in out
    assert "TEF concat fp32" in out and "weights, grads, AdamW" in out
    _, large = _dry_run("--preset", "qvhighlights", "--arch", "ViT-L-14")
    _, half = _dry_run("--preset", "qvhighlights", "--set", "batch_size=64")
    assert large > 4 * total and total / 2 < half < 0.6 * total
    out, _ = _dry_run("--preset", "tacos", "--store", str(_store(tmp_path)), "--arch", "synthetic-tiny",
                      "--set", "model.layers=2")
    assert "x 20 clips (the longest video of" in out and "video tokens (T, 2, 2, 16)" in out


def test_dry_run_on_the_cpu_estimates_fp32_without_the_loader_batch():
    from r2.cli import build_app

    args = ["train", "--dry-run", "--preset", "charades", "--device", "cpu"]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    assert "one training step on the CPU:" in result.output and "loader batch" not in result.output


def test_store_extent_is_the_longest_video_and_query(tmp_path):
    spec = SyntheticSpec(n_videos=3, clips=20, layers=2, query_len=9, queries_per_video=1)
    make_synthetic_store(tmp_path / "s.zarr", spec)
    store = open_store(tmp_path / "s.zarr")
    assert store_extent(store) == (20, 9)
    assert memory.typical_clips("qvh") == 75
    assert memory.typical_clips("tacos") == 500
