"""Fan-out over a dask LocalCluster of two worker processes into one store (extract/fanout.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from extract import fanout
from extract.backbone import load_backbone
from extract.config import ExtractConfig
from extract.fanout import BackboneSpec, split_tasks, worker_backbone
from extract.frames import preprocess, sample_frames
from extract.job import run_extraction
from extract.pipeline import VideoTask
from shards.store import open_store
from shards.verify import verify_store
from tests.helpers.videos import make_video


def test_split_tasks_balances_and_caps() -> None:
    tasks = [VideoTask(f"v{i}", None, 1.0) for i in range(100)]
    groups = split_tasks(tasks, workers=2)
    assert [t.vid for g in groups for t in g] == [t.vid for t in tasks]
    assert max(len(g) for g in groups) == 8
    assert [len(g) for g in split_tasks(tasks[:3], workers=2)] == [1, 1, 1]


def test_each_worker_builds_on_its_gpu_made_current(monkeypatch) -> None:
    """LocalCluster worker 5 with 4 GPUs: GPU 1, set as the current device on every task (the backbone
    is built once); a CPU worker never touches CUDA."""
    import distributed

    current: list[int] = []
    built: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(distributed, "get_worker", lambda: SimpleNamespace(name=5))

    pools: list[int] = []

    def load(**args: object) -> object:
        built.append(str(args["device"]))
        pools.append(int(str(args["token_pool"])))
        return object()

    monkeypatch.setattr(fanout, "load_backbone", load)
    monkeypatch.setattr(fanout, "_BACKBONES", {})
    spec = BackboneSpec("ViT-B-32", "random", 2, "cuda", 0, None)
    worker_backbone(spec)
    worker_backbone(spec)
    assert built == ["cuda:1"] and current == [1, 1]
    worker_backbone(BackboneSpec("ViT-B-32", "random", 2, "cpu", 0, None, token_pool=7))
    assert built == ["cuda:1", "cpu"] and current == [1, 1]
    assert pools == [1, 7]  # the store's pooling reaches the workers' backbones


def test_two_worker_processes_write_one_store(tmp_path, write_charades) -> None:
    folder = tmp_path / "videos"
    folder.mkdir()
    make_video(folder / "a.mp4", frames=20, rate=10)  # 2 frames at 1 fps
    make_video(folder / "b.mp4", width=48, height=64, frames=30, rate=10)  # 3 frames
    (folder / "broken.mp4").write_text("not a video")
    rows = [
        (0, "a", "a red square"),
        (1, "b", "a green ramp"),
        (2, "b", "blue light"),
        (3, "broken", "nothing"),
    ]
    ann = write_charades(tmp_path / "charades_test.jsonl", rows, 2.0)
    cfg = ExtractConfig(
        dataset="charades",
        videos=folder,
        annotations=[ann],
        out=tmp_path / "s.zarr",
        pretrained="random",
        device="cpu",
        scheduler="local",
        dask_workers=2,
        batch_size=4,
        workers=1,
        progress=False,
    )
    summary = run_extraction(cfg)
    assert (summary.extracted, summary.frames, summary.queries_written) == (2, 5, 3)
    assert set(summary.failures) == {"broken"} and "not a readable video" in summary.failures["broken"]
    assert summary.exit_code == 1

    # the workers built the same seeded backbone as this process does
    local = load_backbone("ViT-B-32", "random", device="cpu")
    store = open_store(cfg.out)
    assert store.manifest.weights_sha256 == local.weights_sha256
    assert store.video_ids() == ["a", "b"]
    for vid in ("a", "b"):
        frames = np.stack(list(sample_frames(folder / f"{vid}.mp4", 1.0)))
        expected = local.encode_frames(preprocess(frames)).numpy()
        np.testing.assert_allclose(store.read_video(vid).astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    (tokens,) = local.encode_texts(["blue light"])
    np.testing.assert_allclose(store.read_query(2).astype(np.float32), tokens.numpy(), rtol=2e-3, atol=2e-3)
    assert sorted(q.qid for q in store.annotations()) == [0, 1, 2]
    assert verify_store(cfg.out).ok
