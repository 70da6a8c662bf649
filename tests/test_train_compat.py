"""``train.compat.open_store_for``: the store identity a checkpoint records, old and new."""

from __future__ import annotations

import pytest

from shards.errors import StoreError
from tests.helpers.synthetic import SyntheticSpec, make_synthetic_store
from train.compat import open_store_for

OLD_FIELDS = ("backbone", "pretrained", "weights_sha256", "fps", "layers", "video_tokens", "video_width",
              "text_width", "dataset")
"""What checkpoints of the previous version record (a subset of ``shards.manifest.IDENTITY_FIELDS``)."""


def test_checkpoints_of_either_version_open_their_store_and_others_are_refused(tmp_path):
    store = make_synthetic_store(tmp_path / "s.zarr", SyntheticSpec(n_videos=1, clips=12, max_len=4))
    identity = store.manifest.identity()  # what a checkpoint records now
    assert set(OLD_FIELDS) < set(identity)
    old = {k: identity[k] for k in OLD_FIELDS}
    for recorded in (identity, old):
        assert open_store_for(recorded, tmp_path / "s.zarr", "best.pt").manifest == store.manifest
    with pytest.raises(StoreError, match="best.pt was trained on another store: .*frame_size is 224"):
        open_store_for({**identity, "frame_size": 336}, tmp_path / "s.zarr", "best.pt")
