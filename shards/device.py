"""The one device resolver (``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> a torch device, checked), the
device a process trains or extracts on (:func:`use_device`), and which GPU each worker of a local
cluster gets (:func:`trial_gpus`, :func:`worker_device`, :func:`gpu_sharers`: pure functions).

torch is imported when a function needs it, so ``shards`` stays importable without it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from shards.errors import ConfigError

if TYPE_CHECKING:
    import torch


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when a GPU is visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> a torch device.

    Raises:
        ConfigError: an unknown or unsupported name, CUDA asked for where no GPU is visible, or an
            index beyond the visible GPUs.
    """
    import torch

    text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(
            f"device {name!r} asked for but only {count} CUDA device{'s' * (count != 1)} "
            f"{'are' if count != 1 else 'is'} visible here (cuda:0 to cuda:{count - 1}); "
            "use one of them, cuda (all of them) or cpu"
        )
    return device


def use_device(name: str) -> torch.device:
    """:func:`resolve_device`, and for CUDA make the device the current one of this thread
    (``torch.cuda.set_device``), so that nothing (pinned-memory copies, ``mem_get_info``, a tensor
    made without a device) opens a context on GPU 0 as well. ``cuda`` becomes ``cuda:<current>``.

    Raises:
        ConfigError: as :func:`resolve_device`.
    """
    import torch

    device = resolve_device(name)
    if device.type != "cuda":
        return device
    index = torch.cuda.current_device() if device.index is None else device.index
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def thread_device() -> Callable[[], None] | None:
    """An initializer for worker threads that makes the calling thread's current CUDA device theirs (a
    new thread starts on GPU 0, and its first pinned buffer or copy would open a context there);
    ``None`` when this process has not started CUDA."""
    import torch

    if not torch.cuda.is_initialized():
        return None
    index = torch.cuda.current_device()
    return lambda: torch.cuda.set_device(index)


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def trial_gpus(device: str, visible: int) -> list[int]:
    """Indices of the GPUs that work asked to run on ``device`` spreads over, with ``visible`` GPUs:
    none for ``cpu`` (or ``auto`` without GPU), ``[N]`` for ``cuda:N``, all for ``cuda`` / ``auto``."""
    text = (device or "auto").strip().lower()
    if text.startswith("cuda:"):
        return [int(text.split(":", 1)[1])]
    return list(range(visible)) if text in ("auto", "cuda") else []


def worker_device(device: str, visible: int, worker: object) -> str:
    """Device of worker ``worker`` of a local cluster (an ``int`` name, 0-based) for work asked to run
    on ``device`` with ``visible`` GPUs: worker ``i`` gets GPU ``i mod #GPUs`` of :func:`trial_gpus`;
    an explicit ``cuda:N`` stays on GPU N; ``cpu``, a machine without GPU or a worker of an external
    cluster (a name that is not an ``int``) keep ``device``."""
    gpus = trial_gpus(device, visible)
    if not gpus or not isinstance(worker, int) or isinstance(worker, bool):
        return device
    return f"cuda:{gpus[worker % len(gpus)]}"


def gpu_sharers(workers: int, gpus: int) -> int:
    """Most workers that share one GPU when ``workers`` are spread round-robin over ``gpus`` GPUs
    (what each worker's share of a GPU's memory is divided by)."""
    return max(1, math.ceil(workers / max(gpus, 1)))


def dask_worker_device(device: str) -> str:
    """The device of this LocalCluster worker process for work asked to run on ``device``
    (:func:`worker_device` with the worker's name); ``device`` itself outside a dask worker."""
    if device == "cpu":
        return device
    from distributed import get_worker

    try:
        name = get_worker().name
    except ValueError:
        return device
    return worker_device(device, visible_gpus(), name)
