"""Safe checkpoint files: atomic save, ``weights_only`` load, clear errors.

Our format (``torch.save`` of plain types and tensors only, so ``torch.load(weights_only=True)`` reads it)::

    {"format_version": 1, "state_dict": {name: tensor}, "config": RunConfig.to_dict(), "meta": {...}}

Official R²-Tuning checkpoints (``{"state_dict", "meta"}``) and bare state dicts load too; they carry no
config, so the caller names the preset. Nothing is ever unpickled beyond what ``weights_only`` allows:
when an official ``meta`` holds objects that would need allow-listing (numpy scalars, config classes),
they are replaced by inert placeholders and only the state dict is kept.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shards.atomic import atomic_path
from shards.errors import CheckpointError, ConfigError
from train.config import RunConfig
from train.model import R2Tuning

FORMAT_VERSION = 1
_CORRUPT = "not a torch checkpoint, or the file is corrupt or truncated"
_LIST_LIMIT = 4


@dataclass
class Checkpoint:
    """The content of a checkpoint file.

    Attributes:
        path: file it was read from.
        state_dict: parameter and buffer tensors by name.
        config: resolved config dict (``None`` for official checkpoints and bare state dicts).
        meta: free-form plain data (epoch, metrics, store manifest, ...); empty when dropped.
        dropped_meta: globals of an official ``meta`` that were not unpickled (then ``meta`` is empty).
    """

    path: Path
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    dropped_meta: list[str] = field(default_factory=list)


def save_checkpoint(
    path: str | Path, model: nn.Module, cfg: RunConfig, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model``'s weights, the resolved ``cfg`` and ``extra`` (stored as ``meta``) atomically.

    ``extra`` may hold plain Python values, tensors, numpy arrays/scalars and paths (converted).
    The file is written under a temporary name in the same folder and renamed when complete.

    Returns:
        the checkpoint path.

    Raises:
        OSError: naming ``path`` when the disk is full or the folder read-only (also when ``torch.save``
            reports it as a ``RuntimeError``: :func:`shards.atomic.writes_to`); ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "config": cfg.to_dict(),
        "meta": _plain(dict(extra or {}), "meta"),
    }
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file (ours, official, or a bare state dict) without building a model.

    Raises:
        CheckpointError: missing file, unreadable/corrupt file, or not a checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    dropped: list[str] = []
    try:
        obj = _load(path)
    except pickle.UnpicklingError as err:
        dropped = _unsafe_globals(path)
        if not dropped:
            raise CheckpointError(f"cannot read checkpoint {path}: {_CORRUPT} ({_first_line(err)})") from None
        obj = _load_with_placeholders(path, dropped)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        state_dict, config, meta = obj["state_dict"], obj.get("config"), obj.get("meta", {})
    else:
        state_dict, config, meta = obj, None, {}
    if not _is_state_dict(state_dict):
        raise CheckpointError(
            f"{path} is not a model checkpoint: expected a state dict or a dict with 'state_dict' of tensors"
        )
    if dropped or not isinstance(meta, dict):
        meta = {}
    if config is not None and not isinstance(config, dict):
        raise CheckpointError(f"{path}: 'config' is not a dict; re-save the checkpoint with save_checkpoint")
    return Checkpoint(path=path, state_dict=dict(state_dict), config=config, meta=meta, dropped_meta=dropped)


def load_checkpoint(
    path: str | Path, cfg: RunConfig | None = None, device: str | torch.device = "cpu"
) -> tuple[R2Tuning, RunConfig, Checkpoint]:
    """Build the model of a checkpoint and load its weights (strict).

    Args:
        path: checkpoint file.
        cfg: config to build the model with; default: the config stored in the checkpoint. Required
            for official checkpoints, which store none (use ``train.config.get_preset``).
        device: where to put the model.

    Returns:
        (model in eval mode, config, checkpoint content).

    Raises:
        CheckpointError: unreadable file, no config available, or weights that do not fit the model.
    """
    ckpt = read_checkpoint(path)
    if cfg is None:
        if ckpt.config is None:
            raise CheckpointError(
                f"{ckpt.path} holds no config (an official checkpoint?): "
                "name its preset, e.g. --preset qvhighlights"
            )
        try:
            cfg = RunConfig.from_dict(ckpt.config)
        except ConfigError as err:
            raise CheckpointError(f"{ckpt.path}: stored config is invalid: {err}") from None
    model = R2Tuning(cfg.model, cfg.loss)
    load_weights(model, ckpt.state_dict, f"checkpoint {ckpt.path}", cfg)
    return model.to(device).eval(), cfg, ckpt


def load_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, cfg: RunConfig
) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with a short, readable error on mismatch.

    Raises:
        CheckpointError: names the missing, unexpected and wrongly shaped entries (first few of each).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    problems = [
        f"{label}: {text}"
        for label, text in (
            ("missing", _by_module(missing)),
            ("unexpected", _by_module(unexpected)),
            ("shape (file vs model)", _short_list(shapes)),
        )
        if text
    ]
    if problems:
        raise CheckpointError(
            f"{source} does not fit preset {cfg.preset!r} ({cfg.model.arch}): {'; '.join(problems)}; "
            "pick the preset/backbone the checkpoint was trained with"
        )
    model.load_state_dict(dict(state_dict), strict=True)


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise
    except Exception as err:  # torch raises RuntimeError, EOFError, zipfile errors... for damaged files
        raise CheckpointError(f"cannot read checkpoint {path}: {_CORRUPT} ({_first_line(err)})") from None


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a damaged pickle stream: no usable list of globals
        return []


class _Placeholder:
    """Inert stand-in for a global that ``weights_only`` does not allow: accepts and ignores everything."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _load_with_placeholders(path: Path, names: list[str]) -> Any:
    """``weights_only`` load where each global in ``names`` becomes an inert placeholder class."""
    stubs: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (type(name.rsplit(".", 1)[-1], (_Placeholder,), {}), name) for name in names
    ]
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot read checkpoint {path} safely ({_first_line(err)}); "
            "re-save its state dict with torch.save"
        ) from None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _plain(value: Any, where: str) -> Any:
    """Convert ``value`` to types a ``weights_only`` load accepts (or raise TypeError naming ``where``)."""
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {
            k if isinstance(k, (str, int)) else str(k): _plain(v, f"{where}.{k}") for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"checkpoint {where} holds a {type(value).__name__}; only plain data and tensors can be saved"
    )


def _by_module(names: list[str]) -> str:
    """``pyramid.* (24), coord_head.* (4)``: entry counts per top-level module."""
    counts: dict[str, int] = {}
    for name in names:
        prefix = name.split(".")[0]
        counts[prefix] = counts.get(prefix, 0) + 1
    return ", ".join(f"{prefix}.* ({n})" for prefix, n in counts.items())


def _short_list(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f" (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


def _first_line(err: BaseException) -> str:
    """The informative line of a torch error (its unpickler detail when there is one)."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
