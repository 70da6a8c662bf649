"""Shared test set-up: skipping of GPU tests, tiny store manifests, small Charades-STA annotation files."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytest
import torch

from shards.cliutil import TOOLKIT_LOGGERS
from shards.manifest import Manifest
from tests.helpers.fixtures import make_tiny_manifest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``cuda`` where no CUDA device is visible (``make test-gpu`` runs only them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def toolkit_logging() -> Iterable[None]:
    """Put the toolkit's loggers back as they were after each test: a test that runs ``r2.cli.main``
    configures them as the command does (own handler, no propagation), which would hide later tests'
    records from ``caplog``."""
    loggers = [logging.getLogger(name) for name in TOOLKIT_LOGGERS]
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    yield
    for lg, (handlers, propagate, level) in zip(loggers, saved, strict=True):
        lg.handlers, lg.propagate, lg.level = handlers, propagate, level


@pytest.fixture
def one_torch_thread() -> Iterable[None]:
    """Tiny models on a shared 2-core box run fastest with one intra-op thread (no oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_manifest() -> Callable[..., Manifest]:
    """Factory ``tiny_manifest((k, P, C, Cq), **overrides)`` of a store manifest with that token geometry
    (:func:`tests.helpers.fixtures.make_tiny_manifest`)."""
    return make_tiny_manifest


@pytest.fixture(scope="session")
def write_charades() -> Callable[..., Path]:
    """Factory ``write_charades(path, rows, duration, window=(0, 1))`` -> ``path``.

    Writes a Charades-STA JSON Lines file with one record per ``(qid, vid, query)`` row; every
    record has the same ``duration`` and one relevant window, both in seconds.
    """

    def write(
        path: Path,
        rows: Iterable[tuple[int, str, str]],
        duration: float,
        window: Sequence[float] = (0.0, 1.0),
    ) -> Path:
        records = (
            {"qid": qid, "query": text, "duration": duration, "vid": vid, "relevant_windows": [list(window)]}
            for qid, vid, text in rows
        )
        path.write_text("\n".join(json.dumps(r) for r in records))
        return path

    return write
