"""The store's size under control: int8 tokens with a scale per token (shards/quant.py, the store, the
loaders and the token cache) and N x N pooling of the patch grid at extraction; checkpoints refuse a
store made otherwise."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import shards.store as store_mod
from extract.backbone import load_backbone
from shards.backbones import get_backbone
from shards.errors import ConfigError, StoreError
from shards.manifest import Manifest, pooled_tokens
from shards.quant import dequantize, dequantize_packed, pack, quantize, roundtrip, unpack
from shards.report import inspect_store
from shards.schema import Query
from shards.store import FeatureStore, create_store, open_store
from shards.verify import verify_store
from tests.helpers.fixtures import TINY_STEP_OVERRIDES, make_tiny_manifest
from tests.helpers.synthetic import SyntheticSpec, make_synthetic_store, synthetic_run_config
from train.compat import config_for_store, open_store_for
from train.config import get_preset
from train.data.assembly import Batch, copy_tokens, dequantize_tensor
from train.data.cache import CachePlan, TokenCache, needed_bytes
from train.data.loader import LoaderConfig, StreamingLoader
from train.data.uniform import UniformLoader
from train.engine.score import score_checkpoint
from train.engine.trainer import train_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K, P, C, CQ = 3, 4, 16, 8
TENSORS = ("video", "video_mask", "video_index", "query", "query_mask", "fps")


def _tokens(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 tokens whose magnitude varies by token (as CLIP's do), with an all-zero token."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * np.exp(rng.uniform(-4, 4, (*shape[:-1], 1)))
    x.reshape(-1, shape[-1])[0] = 0
    return x.astype(np.float32)


# --- quantization -------------------------------------------------------------------------------------------


def test_quantization_error_is_within_a_127th_of_each_tokens_peak() -> None:
    x = _tokens(0, (40, K, P, 64))
    x[1, 0, 0] *= 1e-6  # scales below float16's normal range
    x[2, 0, 0] = np.linspace(-65000, 65000, 64)  # near float16's largest
    q, scale = quantize(x)
    assert q.dtype == np.int8 and q.shape == x.shape and scale.dtype == np.float16
    assert scale.shape == (*x.shape[:-1], 1) and np.abs(q.astype(np.int32)).max() <= 127
    x16 = x.astype(np.float16).astype(np.float32)
    peak = np.abs(x16).max(axis=-1, keepdims=True)
    back = dequantize(q, scale).astype(np.float32)
    error = np.abs(back - x16)
    fp16 = np.abs(x16) * 2.0**-11 + 2.0**-24  # float16 rounding of the result
    assert (error <= peak / 127 + fp16).all()
    assert (error <= scale.astype(np.float32) / 2 + fp16).all()  # half a step: nothing is clipped
    assert (back.reshape(-1, 64)[0] == 0).all() and np.isfinite(back).all()
    assert np.array_equal(roundtrip(x, "int8"), dequantize(q, scale))
    assert np.array_equal(roundtrip(torch.from_numpy(x), "float16"), x.astype(np.float16))
    with pytest.raises(ConfigError, match="token dtype must be float16 or int8, got 'int4'"):
        roundtrip(x, "int4")


def test_packed_tokens_dequantize_to_the_same_bits_on_every_path() -> None:
    x = _tokens(1, (9, K, P, C))
    x[3] *= 1e-5
    packed = pack(x)
    q, scale = unpack(packed)
    assert packed.shape == (9, K, P, C + 2) and np.array_equal(q, quantize(x)[0])
    assert np.array_equal(scale, quantize(x)[1])
    want = roundtrip(x, "int8")
    out = np.empty_like(want)
    copy_tokens(out, packed)  # the loader's host path
    assert np.array_equal(out.view(np.int16), want.view(np.int16))
    gathered = torch.empty(want.shape, dtype=torch.float16)
    dequantize_tensor(torch.from_numpy(packed[:, 1:]), gathered[:, 1:])  # the device gather, strided
    assert torch.equal(gathered[:, 1:], torch.from_numpy(want[:, 1:]))
    assert np.array_equal(dequantize_packed(packed[:, 1:]), want[:, 1:])


# --- the store ----------------------------------------------------------------------------------------------


def _write(path: Path, manifest: Manifest, videos: dict, queries: dict) -> FeatureStore:
    """A store of ``videos`` (at 1 clip per second) and ``queries``, query ``i`` on video ``v{i % V}``."""
    store = create_store(path, manifest, fsync=False)
    for vid, tokens in videos.items():
        store.write_video(vid, tokens, 1.0)
    store.write_queries(list(queries), list(queries.values()))
    vids = {qid: f"v{qid % len(videos)}" for qid in queries}
    store.write_annotations(
        [Query(v, qid, "q", float(len(videos[v])), "train", [[0.0, 2.0]]) for qid, v in vids.items()]
    )
    return store


def _data(geometry: tuple[int, int, int, int], videos: int = 6) -> tuple[dict, dict]:
    k, p, c, cq = geometry
    vids = {f"v{i}": _tokens(10 + i, (3 + 2 * i, k, p, c)) for i in range(videos)}
    qs = {qid: _tokens(100 + qid, (2 + qid % 5, k, cq)) for qid in range(3 * videos)}
    return vids, qs


@pytest.mark.parametrize("verify", [True, False])
def test_int8_store_gives_the_roundtrip_of_the_written_tokens_on_every_read(
    tmp_path, tiny_manifest, monkeypatch, verify
) -> None:
    monkeypatch.setattr(store_mod, "QUERY_CHUNK_BYTES", 3 * K * (CQ + 2))  # queries span chunks
    videos, queries = _data((K, P, C, CQ))
    _write(tmp_path / "s.zarr", tiny_manifest((K, P, C, CQ), dtype="int8"), videos, queries)
    store = open_store(tmp_path / "s.zarr", verify_reads=verify)
    assert store.manifest.dtype == "int8" and store.quantized
    for vid, tokens in videos.items():
        want = roundtrip(tokens, "int8")
        assert store.read_video(vid).dtype == np.float16
        assert np.array_equal(store.read_video(vid), want) and np.array_equal(store.map_video(vid), want)
        rows = np.zeros((2, len(want) + 1, 2, P, C), np.float16)
        assert store.read_video(vid, out=rows[1, : len(want)], layers=2).base is rows
        assert np.array_equal(rows[1, : len(want)], want[:, 1:]) and not rows[1, len(want)].any()
        assert np.array_equal(store.read_video(vid, layers=1), want[:, 2:])
        stored = store.map_stored(vid)
        assert stored.dtype == np.int8 and stored.shape == (len(want), K, P, C + 2)
        assert np.array_equal(stored, pack(tokens)) and not stored.flags.writeable
        assert np.array_equal(store.read_stored(vid, layers=2), pack(tokens)[:, 1:])
    for qid, tokens in queries.items():
        out = np.empty((len(tokens), K, CQ), np.float16)
        assert store.read_query(qid, out=out) is out and np.array_equal(out, roundtrip(tokens, "int8"))
    with pytest.raises(StoreError, match=r"has shape \(2, 3, 4, 18\), the store needs \(N, k, P, C\)"):
        open_store(store.path, mode="a").write_video("bad", np.zeros((2, K, P, C + 2), np.float32), 1.0)


def test_int8_store_takes_about_half_the_bytes_of_float16(tmp_path, tiny_manifest) -> None:
    geometry = (2, 5, 768, 512)  # ViT-B/32's widths
    videos, queries = _data(geometry, videos=2)
    sizes = {}
    for dtype in ("float16", "int8"):
        store = _write(tmp_path / f"{dtype}.zarr", tiny_manifest(geometry, dtype=dtype), videos, queries)
        files = sum(f.stat().st_size for f in (store.path / "videos").rglob("c.*"))
        sizes[dtype] = (
            sum(store.video_nbytes(v) for v in videos),
            sum(store.query_nbytes(q) for q in queries),
            files,
            inspect_store(store.path)["videos"]["bytes"],
            inspect_store(store.path)["queries"]["bytes"],
            verify_store(store.path).token_bytes,
        )
    ratios = [i / f for i, f in zip(sizes["int8"], sizes["float16"], strict=True)]
    assert all(0.5 < r <= 0.52 for r in ratios), ratios


def test_verify_checks_values_and_scales_of_an_int8_store(tmp_path, tiny_manifest) -> None:
    videos, queries = _data((K, P, C, CQ), videos=2)
    store = _write(tmp_path / "s.zarr", tiny_manifest((K, P, C, CQ), dtype="int8"), videos, queries)
    report = verify_store(store.path)
    assert report.ok and report.dtype == "int8" and report.videos == 2
    chunk = store.path / "videos" / "v1" / "c.0.0.0.0"
    data = bytearray(chunk.read_bytes())
    data[C] ^= 0x40  # a byte of the first token's scale
    chunk.write_bytes(bytes(data))
    problems = verify_store(store.path).problems
    assert [(p.kind, p.item) for p in problems] == [("checksum", "v1")]
    with pytest.raises(StoreError, match="the tokens of video 'v1' are corrupt"):
        open_store(store.path).read_video("v1")
    with pytest.raises(StoreError, match="the tokens of video 'v1' are corrupt"):
        open_store(store.path).map_stored("v1")


def test_store_dtype_must_be_known(tmp_path, tiny_manifest) -> None:
    with pytest.raises(ConfigError, match="token dtype must be float16 or int8, got 'bfloat16'"):
        tiny_manifest((K, P, C, CQ), dtype="bfloat16")
    store = create_store(tmp_path / "s.zarr", tiny_manifest((K, P, C, CQ)), fsync=False)
    meta = json.loads((store.path / "zarr.json").read_text())
    meta["attributes"]["dtype"] = "int4"
    (store.path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="holds 'int4' tokens, this package reads float16 or int8 stores"):
        open_store(store.path)


# --- loaders and the token cache ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twin_stores(tmp_path_factory) -> tuple[Path, Path]:
    """An int8 store of some tokens, and a float16 store of their :func:`roundtrip`."""
    root = tmp_path_factory.mktemp("twins")
    videos, queries = _data((K, P, C, CQ), videos=8)
    _write(root / "int8.zarr", make_tiny_manifest((K, P, C, CQ), dtype="int8"), videos, queries)
    videos16 = {v: roundtrip(t, "int8") for v, t in videos.items()}
    queries16 = {q: roundtrip(t, "int8") for q, t in queries.items()}
    _write(root / "float16.zarr", make_tiny_manifest((K, P, C, CQ)), videos16, queries16)
    return root / "int8.zarr", root / "float16.zarr"


def _batches(loader, epochs: int = 2) -> list[Batch]:
    found = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        found += [Batch(**{n: getattr(b, n).clone() for n in TENSORS}, queries=b.queries, vids=b.vids)
                  for b in loader]
    return found


def _same(a: list[Batch], b: list[Batch]) -> bool:
    def equal(x: Batch, y: Batch) -> bool:
        tensors = all(torch.equal(getattr(x, n), getattr(y, n)) for n in TENSORS)
        return tensors and x.vids == y.vids and x.queries == y.queries

    return len(a) == len(b) > 0 and all(equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("layers", [None, 2])
def test_loaders_give_the_batches_of_a_float16_store_of_the_roundtrip(twin_stores, layers) -> None:
    int8, half = twin_stores
    config = LoaderConfig(batch_size=5, videos_per_batch=3, layers=layers, read_threads=2)
    assert _same(_batches(StreamingLoader(int8, config)), _batches(StreamingLoader(half, config)))
    for mode in ("off", "ram", "device"):  # device: the GPU's gathers, run on the CPU here
        plan = CachePlan(mode, torch.device("cpu"), 2**40, 0)
        caches = [TokenCache(open_store(s), plan, layers) for s in (int8, half)]
        uniform = [
            _batches(UniformLoader(c, s, batch_size=6, seed=3, layers=layers))
            for c, s in zip(caches, twin_stores, strict=True)
        ]
        assert _same(*uniform), mode
        pooled = [_batches(StreamingLoader(c, LoaderConfig(batch_size=4, layers=layers))) for c in caches]
        assert _same(*pooled), mode
        assert np.array_equal(caches[0].read_video("v2"), caches[1].read_video("v2"))
    cache = TokenCache(open_store(int8), CachePlan("ram", torch.device("cpu"), 2**40, 0), layers)
    assert all(cache.video_tensor(v).dtype == torch.int8 for v in cache.video_ids())  # kept as stored
    queries, wide, narrow = cache.annotations(), open_store(half), open_store(int8)
    saved = sum(wide.video_nbytes(v) - narrow.video_nbytes(v) for v in wide.video_ids())
    keep = K if layers is None else layers  # videos counted as kept (int8), queries as float16
    assert needed_bytes(wide, queries, layers) - needed_bytes(narrow, queries, layers) == saved // K * keep


# --- token pooling ------------------------------------------------------------------------------------------


def test_pooled_token_counts_and_refusals() -> None:
    assert pooled_tokens(get_backbone("ViT-B-16-SigLIP").video_tokens, 2) == 50  # B/32's P
    assert pooled_tokens(197, 1) == 197 and pooled_tokens(577, 4) == 37 and pooled_tokens(50, 7) == 2
    with pytest.raises(ConfigError) as info:
        load_backbone("ViT-S-32", "random", token_pool=2)  # refused before anything is built
    assert str(info.value) == (
        "--token-pool 2 does not divide the 7x7 patch grid of ViT-S-32: use one of 1, 7"
    )
    with pytest.raises(ConfigError, match="--token-pool must be a positive integer, got 0"):
        pooled_tokens(197, 0)


@torch.inference_mode()
def test_pooled_frames_keep_token_0_and_average_each_block_of_the_grid() -> None:
    full = load_backbone("ViT-S-16", "random", layers=2, device="cpu")
    pooled = load_backbone("ViT-S-16", "random", layers=2, device="cpu", token_pool=2)
    assert (full.video_tokens, pooled.video_tokens, pooled.token_pool) == (197, 50, 2)
    manifest = pooled.info().manifest("charades", 0.5, dtype="int8")
    assert (manifest.video_tokens, manifest.token_pool, manifest.dtype) == (50, 2, "int8")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens, reference = pooled.encode_frames(images), full.encode_frames(images)
    assert tokens.shape == (2, 2, 50, full.video_width)
    torch.testing.assert_close(tokens[:, :, 0], reference[:, :, 0], rtol=0, atol=0)
    grid = reference[:, :, 1:].reshape(2, 2, 14, 14, -1)
    for row, col in [(0, 0), (0, 6), (3, 2), (6, 6)]:
        block = grid[:, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2].mean(dim=(2, 3))
        torch.testing.assert_close(tokens[:, :, 1 + 7 * row + col], block, rtol=1e-5, atol=1e-6)
    texts = ["a dog", "a person opens the door"]
    assert [t.shape for t in pooled.encode_texts(texts)] == [t.shape for t in full.encode_texts(texts)]


# --- checkpoints and configs refuse a store made otherwise -----------------------------------------------


def test_a_checkpoint_refuses_a_store_of_another_dtype_or_pooling(tmp_path, tiny_manifest) -> None:
    geometry = (K, P, C, CQ)
    videos, queries = _data(geometry, videos=1)
    plain = _write(tmp_path / "plain.zarr", tiny_manifest(geometry), videos, queries)
    other: dict[str, dict[str, Any]] = {
        "int8": {"dtype": "int8"}, "pooled": {"token_pool": 2}, "mean": {"global_token": "mean"}
    }
    for name, fields in other.items():
        _write(tmp_path / f"{name}.zarr", tiny_manifest(geometry, **fields), videos, queries)
    identity = plain.manifest.identity()
    assert open_store_for(identity, plain.path, "best.pt").manifest == plain.manifest
    with pytest.raises(StoreError) as info:
        open_store_for(identity, tmp_path / "int8.zarr", "checkpoint best.pt")
    assert "checkpoint best.pt was trained on another store: " in str(info.value)
    assert "dtype is 'int8' in the store but 'float16' was expected" in str(info.value)
    assert "use the store it was trained on" in str(info.value)
    with pytest.raises(StoreError, match="token_pool is 2 in the store but 1 was expected"):
        open_store_for(identity, tmp_path / "pooled.zarr", "best.pt")
    old = {k: v for k, v in identity.items() if k not in ("token_pool", "global_token", "preprocess")}
    with pytest.raises(StoreError, match="token_pool is 2 in the store but 1 was expected"):
        open_store_for(old, tmp_path / "pooled.zarr", "best.pt")  # recorded before pooling: pool 1
    with pytest.raises(StoreError, match="global_token is 'mean' in the store but 'cls' was expected"):
        open_store_for(old, tmp_path / "mean.zarr", "best.pt")
    assert open_store_for(old, plain.path, "best.pt").manifest == plain.manifest
    int8_identity = open_store(tmp_path / "int8.zarr").manifest.identity()
    with pytest.raises(StoreError, match="dtype is 'float16' in the store but 'int8' was expected"):
        open_store_for(int8_identity, plain.path, "best.pt")


def test_stores_of_earlier_versions_open_unpooled(tmp_path, tiny_manifest) -> None:
    store = create_store(tmp_path / "s.zarr", tiny_manifest((K, P, C, CQ)), fsync=False)
    meta = json.loads((store.path / "zarr.json").read_text())
    del meta["attributes"]["token_pool"]
    (store.path / "zarr.json").write_text(json.dumps(meta))
    assert open_store(store.path).manifest.token_pool == 1


def test_a_pooled_store_takes_its_p_from_the_pooled_grid(tmp_path, tiny_manifest) -> None:
    cfg = get_preset("charades", arch="ViT-B-16-SigLIP")
    geometry = (4, 50, 768, 768)
    pooled = tiny_manifest(geometry, backbone="ViT-B-16-SigLIP", token_pool=2)
    assert config_for_store(cfg, pooled, tmp_path).model.token_dims() == (50, 768, 768)
    unpooled = tiny_manifest(geometry, backbone="ViT-B-16-SigLIP")
    with pytest.raises(StoreError, match=r"\(P, C, Cq\) are \(50, 768, 768\) but the config gives \(197"):
        config_for_store(cfg, unpooled, tmp_path)


# --- the whole chain on an int8 store -----------------------------------------------------------------------


def _as_int8(source: Path, target: Path) -> Path:
    """A copy of the float16 store ``source`` whose tokens are stored as int8."""
    old = open_store(source)
    new = create_store(target, dataclasses.replace(old.manifest, dtype="int8"), fsync=False)
    for vid in old.video_ids():
        new.write_video(vid, old.read_video(vid), old.video_fps(vid))
    qids = old.query_ids()
    new.write_queries(qids, [old.read_query(q) for q in qids])
    new.write_annotations(old.annotations())
    return target


def test_train_and_score_on_an_int8_store_and_refuse_its_checkpoint_elsewhere(tmp_path) -> None:
    spec = SyntheticSpec(n_videos=6, clips=16, n_heldout=2, max_len=5, seed=5)
    half = make_synthetic_store(tmp_path / "half.zarr", spec).path
    int8 = _as_int8(half, tmp_path / "int8.zarr")
    cfg = synthetic_run_config(spec, "tacos", [*TINY_STEP_OVERRIDES, "epochs=1", "train.cache=ram"])
    train_run(cfg, int8, tmp_path / "run", device="cpu", progress=False)
    scored = score_checkpoint(tmp_path / "run" / "last.pt", int8, "val", device="cpu")
    assert scored.labelled and scored.validation.metrics
    with pytest.raises(StoreError, match="dtype is 'float16' in the store but 'int8' was expected"):
        score_checkpoint(tmp_path / "run" / "last.pt", half, "val", device="cpu")


@pytest.mark.cuda
def test_a_device_cache_keeps_int8_on_the_gpu_and_gathers_the_float16_batches(twin_stores) -> None:
    int8, half = twin_stores
    gpu = TokenCache(open_store(int8), CachePlan("device", torch.device("cuda"), 2**30, 0), 2)
    host = TokenCache(open_store(half), CachePlan("ram", torch.device("cpu"), 2**30, 0), 2)
    on_gpu = _batches(UniformLoader(gpu, int8, batch_size=6, seed=3, layers=2))
    assert all(t.dtype == torch.int8 and t.is_cuda for t in map(gpu.video_tensor, gpu.video_ids()))
    assert all(b.video.is_cuda for b in on_gpu)
    on_host = _batches(UniformLoader(host, half, batch_size=6, seed=3, layers=2))
    assert _same([b.to("cpu") for b in on_gpu], on_host)
