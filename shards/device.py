"""The one device resolver: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> a torch device, checked.

torch is imported when the function runs, so ``shards`` stays importable without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shards.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when a GPU is visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> a torch device.

    Raises:
        ConfigError: an unknown or unsupported name, or CUDA asked for where no GPU is visible.
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
    return device
