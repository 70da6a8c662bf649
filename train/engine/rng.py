"""Seeding and saving/restoring the global random generators (python, numpy, torch CPU and the training
GPU's), and the deterministic-algorithm switches.

States are converted to tensors and plain lists so that checkpoints load with ``weights_only=True``.
Only the CUDA generator of the training device is saved (``"cuda"``: its state, ``None`` for a CPU run),
so a checkpoint resumes with any number of visible GPUs; checkpoints of earlier versions hold a list of
one state per visible GPU and still restore (:func:`restore_rng`).
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

CUBLAS_WORKSPACE = ":4096:8"
"""``CUBLAS_WORKSPACE_CONFIG`` of deterministic cuBLAS (:func:`set_deterministic` sets it when unset)."""


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's legacy global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """The cuDNN switches every run of the reference sets (nncore's ``set_random_seed(...,
    deterministic=True)``: ``cudnn.deterministic`` on, ``cudnn.benchmark`` off), and with ``enabled``
    (``train.deterministic``, opt-in, stricter than the reference) also
    ``torch.use_deterministic_algorithms(True)`` and, when unset, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
    (cuBLAS reads it when it starts, so set it in the environment for a process that used CUDA before):
    slower on CUDA, and an op with no deterministic CUDA kernel then raises."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)


def capture_rng(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The current states of the global generators as checkpoint-safe data: python, numpy, torch's CPU
    generator and, when ``device`` (the training device) is a CUDA device, its CUDA generator."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = _cuda_index(device)
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": None if cuda is None else torch.cuda.get_rng_state(cuda),
    }


def restore_rng(states: dict[str, Any], device: torch.device | str = "cpu") -> None:
    """Restore states saved by :func:`capture_rng` for training on ``device``.

    The saved CUDA state goes to ``device``'s generator when it is a CUDA device. A list of states (a
    checkpoint of an earlier version, one per GPU visible then) gives the entry of ``device``'s index
    when it has one, else its first; no CUDA state (a CPU run) leaves the generator as it is.
    """
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = states["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(states["torch"])
    cuda = _cuda_index(device)
    saved = states.get("cuda")
    if cuda is None or saved is None:
        return
    if isinstance(saved, list | tuple):
        if not saved:
            return
        saved = saved[cuda] if cuda < len(saved) else saved[0]
    torch.cuda.set_rng_state(saved, cuda)


def _cuda_index(device: torch.device | str) -> int | None:
    """Index of the CUDA device ``device`` (the current one for a bare ``cuda``); ``None`` for another
    device type or when CUDA is not available."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.current_device() if device.index is None else device.index
