"""The public Python API of the toolkit: ``from r2 import Predictor, Grounder, open_store, ...``.

>>> from r2 import Predictor
>>> p = Predictor.from_checkpoint("runs/qvh/best.pt")
>>> p.predict(p.encode_video("cooking.mp4"), "a man cuts an onion").moments[:3]

Names are imported on first use (PEP 562), so ``import r2`` and the ``r2`` command do not load
torch, open_clip or zarr until something needs them. The packages behind these names
(``shards``, ``extract``, ``train``, ``eval``) stay importable, but only the names below are the
stable API.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eval.metrics import evaluate
    from eval.predictions import QueryPrediction, read_predictions, write_predictions
    from extract.backbone import ClipBackbone, load_backbone
    from r2.predict import EncodedVideo, Predictor, VideoPrediction
    from shards.annotations import load_annotations
    from shards.errors import R2Error
    from shards.manifest import Manifest
    from shards.schema import Query
    from shards.store import FeatureStore, create_store, open_store
    from train.config import RunConfig, apply_overrides, get_preset, preset_names
    from train.engine.trainer import TrainResult, train_run
    from train.inference import Grounder, Prediction

_SOURCES = {
    "Predictor": "r2.predict",
    "EncodedVideo": "r2.predict",
    "VideoPrediction": "r2.predict",
    "Grounder": "train.inference",
    "Prediction": "train.inference",
    "open_store": "shards.store",
    "create_store": "shards.store",
    "FeatureStore": "shards.store",
    "Manifest": "shards.manifest",
    "Query": "shards.schema",
    "load_annotations": "shards.annotations",
    "R2Error": "shards.errors",
    "load_backbone": "extract.backbone",
    "ClipBackbone": "extract.backbone",
    "get_preset": "train.config",
    "apply_overrides": "train.config",
    "preset_names": "train.config",
    "RunConfig": "train.config",
    "train_run": "train.engine.trainer",
    "TrainResult": "train.engine.trainer",
    "evaluate": "eval.metrics",
    "QueryPrediction": "eval.predictions",
    "read_predictions": "eval.predictions",
    "write_predictions": "eval.predictions",
}
"""Public name -> module that defines it."""

__all__ = [
    "ClipBackbone",
    "EncodedVideo",
    "FeatureStore",
    "Grounder",
    "Manifest",
    "Prediction",
    "Predictor",
    "Query",
    "QueryPrediction",
    "R2Error",
    "RunConfig",
    "TrainResult",
    "VideoPrediction",
    "apply_overrides",
    "create_store",
    "evaluate",
    "get_preset",
    "load_annotations",
    "load_backbone",
    "open_store",
    "preset_names",
    "read_predictions",
    "train_run",
    "write_predictions",
]


def __getattr__(name: str) -> Any:
    """Import ``name`` from its module on first access and keep it in this module's namespace."""
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'r2' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Module attributes plus the lazily imported public names (for ``dir(r2)`` and completion)."""
    return sorted(set(globals()) | set(__all__))
