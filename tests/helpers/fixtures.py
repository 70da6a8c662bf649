"""What the test modules share besides conftest: a tiny store manifest, a module-scoped synthetic store,
and the tiny store + model settings of the training-step tests (CPU and CUDA)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shards.manifest import Manifest, make_manifest
from tests.helpers.synthetic import SyntheticSpec, make_synthetic_store

TINY_STEP_SPEC = SyntheticSpec(n_videos=6, clips=16, layers=2, max_len=5, seed=5)
"""Store of the training-step tests: 6 videos of 16 clips, 2 layers."""
TINY_STEP_OVERRIDES = (
    "model.dims=32",
    "model.heads=4",
    "batch_size=4",
    "train.pool_size=2",
    "train.num_workers=0",
    "warmup=2",
    "lr=1e-3",
)
"""A small model taking real steps on :data:`TINY_STEP_SPEC` (add ``epochs=``, ``train.amp=``, ...)."""


def make_tiny_manifest(geometry: tuple[int, int, int, int], **overrides: Any) -> Manifest:
    """A store manifest with token geometry ``(k, P, C, Cq)``; the other fields default to a made-up
    ``tiny-vit`` backbone with random weights, 224-px frames, Charades-STA at 1 clip per second, and
    ``overrides`` replace any of them. A plain function, so spawned test processes can call it too."""
    layers, video_tokens, video_width, text_width = geometry
    fields: dict[str, Any] = dict(
        dataset="charades",
        backbone="tiny-vit",
        pretrained="random:0",
        weights_sha256="ab12",
        layers=layers,
        frame_size=224,
        fps=1.0,
        video_tokens=video_tokens,
        video_width=video_width,
        text_width=text_width,
    )
    fields.update(overrides)
    return make_manifest(**fields)


def synthetic_store_fixture(spec: SyntheticSpec) -> Callable[..., Path]:
    """A module-scoped fixture: the path of a synthetic store of ``spec``, written once per module.

    Use as ``store = synthetic_store_fixture(SPEC)`` at module level.
    """

    @pytest.fixture(scope="module")
    def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
        path = tmp_path_factory.mktemp("stores") / "synthetic.zarr"
        make_synthetic_store(path, spec)
        return path

    return store
