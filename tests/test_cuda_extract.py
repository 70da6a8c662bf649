"""Extraction on a GPU: fp32 tokens equal to the CPU's, the asynchronous copies of the pipeline
(extract/pipeline.py), preprocessing that never waits for the GPU.

Every test is marked ``cuda``: skipped where no CUDA device is visible (see ``tests/conftest.py``),
run by ``make test-gpu`` (``pytest -m cuda``) and by a plain ``pytest`` on a machine with a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from extract.backbone import ClipBackbone, load_backbone
from extract.config import ExtractConfig, sample_paths
from extract.frames import preprocess
from extract.job import run_extraction
from extract.pipeline import ImageTower
from shards.store import open_store

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def gpu_backbone() -> ClipBackbone:
    return load_backbone("ViT-B-32", "random", layers=4, device="cuda")


def _relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    value, reference = value.astype(np.float64), reference.astype(np.float64)
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def _frames(count: int, side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def test_fp32_extraction_on_cuda_equals_cpu(tmp_path) -> None:
    videos, files = sample_paths()
    stores = {}
    for device in ("cpu", "cuda:0"):  # an explicit GPU: in this process, never fanned out over several
        cfg = ExtractConfig(
            dataset="charades",
            videos=videos,
            annotations=files,
            out=tmp_path / f"{device.replace(':', '')}.zarr",
            pretrained="random",
            fps=0.5,
            device=device,
            batch_size=4,  # batches span both videos, several in flight on the GPU
            progress=False,
        )
        summary = run_extraction(cfg)
        assert (summary.extracted, summary.failures, summary.frames) == (2, {}, 15 + 5)
        stores[device] = open_store(cfg.out)
    cpu, gpu = stores["cpu"], stores["cuda:0"]
    assert gpu.manifest.weights_sha256 == cpu.manifest.weights_sha256
    assert gpu.manifest.precision == "fp32"
    assert sorted(gpu.video_ids()) == sorted(cpu.video_ids())
    for vid in cpu.video_ids():
        got, want = gpu.read_video(vid), cpu.read_video(vid)
        assert got.shape == want.shape and got.dtype == np.float16 and np.isfinite(got).all()
        for layer in range(4):  # fp32 towers on both; TF32 convolutions on the GPU
            assert _relative_error(got[:, layer], want[:, layer]) < 5e-3, (vid, layer)
    assert sorted(gpu.query_ids()) == sorted(cpu.query_ids())
    for qid in cpu.query_ids():
        assert _relative_error(gpu.read_query(qid), cpu.read_query(qid)) < 5e-3, qid


@pytest.mark.parametrize("depth", [1, 2])
def test_async_copies_give_each_batch_its_own_tokens(gpu_backbone, depth) -> None:
    tower = ImageTower(gpu_backbone, batch_size=6, depth=depth)
    batches = [_frames(n, gpu_backbone.frame_size, seed) for seed, n in enumerate((6, 5, 6, 3, 6))]
    got: list[np.ndarray] = []
    pending = []
    for frames in batches:  # the pipeline's order: submit, then take back the batches beyond depth
        pending.append(tower.submit(frames))
        while len(pending) > depth:
            got.append(pending.pop(0).result())
    got += [p.result() for p in pending]
    assert all(slot.tokens.is_pinned() and slot.frames.is_pinned() for slot in tower.slots)
    for frames, tokens in zip(batches, got, strict=True):
        want = gpu_backbone.encode_frames(preprocess(frames, "cuda")).half().cpu().numpy()
        assert tokens.shape == want.shape == (len(frames), 4, 50, 768)
        assert _relative_error(tokens, want) < 1e-3  # a stale or half-copied buffer is far off


def test_submitting_a_batch_never_waits_for_the_gpu(gpu_backbone) -> None:
    tower = ImageTower(gpu_backbone, batch_size=8, depth=1)
    frames = [_frames(8, gpu_backbone.frame_size, seed) for seed in range(2)]
    tower.submit(frames[0]).result()  # warm-up: kernels chosen, allocator filled
    tower.submit(frames[1]).result()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = tower.submit(frames[0])  # both slots' last batches are done: no wait anywhere
        second = tower.submit(frames[1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert first.result().shape == second.result().shape == (8, 4, 50, 768)
