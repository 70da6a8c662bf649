"""Helpers shared by the benchmarks (``bench_store.py``, ``bench_train.py``, ``bench_sweep.py``): the
machine line of a report and a cold page cache. Imported as ``benchlib`` (the scripts run as
``python scripts/bench_*.py``, which puts this folder on ``sys.path``); importing it also puts the
repository root on ``sys.path``, so that the scripts can use the test helpers (``tests.helpers``)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shards.device import usable_cores  # noqa: E402  (needs the repository root on sys.path)


def machine() -> str:
    """CPU model, usable cores, RAM, Python and torch versions, torch threads, GPU (or "CPU only")."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
    cores = usable_cores()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{cpu}, {cores} usable cores, {ram:.0f} GiB RAM, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}")


def files_under(path: Path) -> list[Path]:
    """``path`` itself when it is a file, else every file below it."""
    path = Path(path)
    if path.is_file():
        return [path]
    return [Path(folder) / name for folder, _, names in os.walk(path) for name in names]


def drop_cache(path: Path) -> None:
    """Evict ``path`` (a file, or every file under a folder) from the page cache.

    ``posix_fadvise(DONTNEED)`` needs no privileges; dirty pages are synced first.
    """
    os.sync()
    for file in files_under(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
