"""Pytest fixtures the test modules share: a module-scoped synthetic store of a given spec."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.synthetic import SyntheticSpec, make_synthetic_store


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
