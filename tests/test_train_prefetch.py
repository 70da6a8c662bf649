"""The training data path on the CPU: side-stream prefetch logic, threaded batch assembly, reading only the
layers the model fuses, device-cache gathers without host copies, and the warning when the pooled loader's
memory bound cuts batches."""

from __future__ import annotations

import logging
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.datasets import get_dataset
from shards.schema import Query
from shards.store import FeatureStore, create_store, open_store
from tests.helpers.fixtures import synthetic_store_fixture
from tests.helpers.synthetic import SyntheticSpec, synthetic_run_config
from train.config import RunConfig
from train.data.assembly import Batch
from train.data.batching import ModelInputs, model_inputs
from train.data.cache import CachePlan, TokenCache, needed_bytes
from train.data.loader import LoaderConfig, StreamingLoader
from train.data.uniform import UniformLoader
from train.engine import rundata
from train.engine.rundata import epoch_inputs, open_run_data, pos_clip_generator, side_stream_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K, P, C, CQ = 3, 2, 4, 4
FPS = 0.5
TENSORS = ("video", "video_mask", "video_index", "query", "query_mask", "fps")
SPEC = SyntheticSpec(n_videos=8, n_heldout=2, clips=12, layers=3, width=8, text_width=8, queries_per_video=3,
                     min_len=1, max_len=3, disjoint=False, dataset="tacos")
TINY = ["batch_size=8", "train.num_workers=0", "model.layers=2", "train.read_threads=3"]
CUT = "memory bound of the pooled loader cuts"

synthetic = synthetic_store_fixture(SPEC)


def vtok(i: int, t: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal((t, K, P, C)).astype(np.float16)


def qtok(qid: int) -> np.ndarray:
    return np.random.default_rng(1000 + qid).standard_normal((2 + qid % 5, K, CQ)).astype(np.float16)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_manifest) -> Path:
    """8 videos of 3..10 clips and 3 layers, 1..3 train queries each of 2..6 tokens (rows of every length)."""
    path = tmp_path_factory.mktemp("prefetch") / "s.zarr"
    s = create_store(path, tiny_manifest((K, P, C, CQ), dataset="tacos", fps=FPS))
    queries = []
    for i in range(8):
        t = 3 + i
        s.write_video(f"v{i}", vtok(i, t), FPS)
        for _ in range(1 + i % 3):
            queries.append(Query(f"v{i}", len(queries), "q", 2.0 * t, "train", [[0.0, 2.0 * t]]))
    s.write_queries([q.qid for q in queries], [qtok(q.qid) for q in queries])
    s.write_annotations(queries)
    return path


def _cache(store: Path, mode: str, layers: int | None = None, verify: bool = True) -> TokenCache:
    plan = CachePlan(mode, torch.device("cpu"), 2**40, 0)
    return TokenCache(open_store(store, verify_reads=verify), plan, layers)


def _same(a: Batch, b: Batch) -> bool:
    tensors = all(torch.equal(getattr(a, n), getattr(b, n)) for n in TENSORS)
    return tensors and a.vids == b.vids and a.queries == b.queries


def _epochs(loader, epochs: int = 2) -> list[Batch]:
    batches = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        batches += [Batch(**{n: getattr(b, n).clone() for n in TENSORS}, queries=b.queries, vids=b.vids)
                    for b in loader]
    return batches


# --- threaded assembly --------------------------------------------------------------------------------------


class SlowStore(FeatureStore):
    """A store whose token reads take 5 ms and record the thread that made them."""

    def __init__(self, base: FeatureStore) -> None:
        super().__init__(base.path, base.manifest, writable=False)
        self.threads: set[str] = set()

    def _slow(self) -> None:
        self.threads.add(threading.current_thread().name)
        time.sleep(0.005)

    def map_video(self, vid):
        self._slow()
        return super().map_video(vid)

    def map_stored(self, vid):
        self._slow()
        return super().map_stored(vid)

    def read_stored(self, vid, layers=None):
        self._slow()
        return super().read_stored(vid, layers)

    def read_video(self, vid, out=None, layers=None):
        self._slow()
        return super().read_video(vid, out, layers)

    def read_query(self, qid, out=None):
        self._slow()
        return super().read_query(qid, out)

    def row_threads(self) -> int:
        return sum(name.startswith("r2-rows") for name in self.threads)


@pytest.mark.parametrize("mode", ["off", "ram"])
def test_threaded_uniform_batches_equal_one_thread(store, mode):
    batches = {}
    for threads in (1, 4):
        source = SlowStore(open_store(store))
        cache = TokenCache(source, CachePlan(mode, torch.device("cpu"), 2**40, 0))
        loader = UniformLoader(cache, store, batch_size=6, repeat=2, seed=4, read_threads=threads)
        batches[threads] = _epochs(loader)
        assert source.row_threads() == 0 if threads == 1 else source.row_threads() > 1
    assert len(batches[1]) == len(batches[4]) > 0
    assert all(_same(a, b) for a, b in zip(batches[1], batches[4], strict=True))


def test_threaded_pooled_batches_equal_one_thread(store):
    def run(threads: int) -> tuple[list[Batch], int]:
        source = SlowStore(open_store(store))
        config = LoaderConfig(batch_size=5, videos_per_batch=3, seed=2, read_threads=threads)
        return _epochs(StreamingLoader(source, config)), source.row_threads()

    (one, none), (four, several) = run(1), run(4)
    assert none == 0 and several > 1
    assert len(one) == len(four) > 0 and all(_same(a, b) for a, b in zip(one, four, strict=True))


# --- layers -------------------------------------------------------------------------------------------------


def _sliced(batch: Batch, layers: int) -> Batch:
    """``batch`` with its tokens cut to the last ``layers`` layers after the fact."""
    return Batch(
        **{n: getattr(batch, n) for n in TENSORS if n not in ("video", "query")},
        video=batch.video[:, :, -layers:],
        query=batch.query[:, :, -layers:],
        queries=batch.queries,
        vids=batch.vids,
    )


@pytest.mark.parametrize(("mode", "workers"), [("off", 0), ("off", 2), ("ram", 0), ("device", 0)])
def test_uniform_loader_reading_two_of_three_layers_equals_slicing_after(store, mode, workers):
    full = _epochs(UniformLoader(_cache(store, mode), store, batch_size=6, seed=1))
    cache = _cache(store, mode, layers=2, verify=mode != "ram")
    two = _epochs(UniformLoader(cache, store, batch_size=6, seed=1, layers=2, num_workers=workers))
    assert all(b.video.shape[2] == b.query.shape[2] == 2 and b.video.is_contiguous() for b in two)
    assert all(_same(_sliced(a, 2), b) for a, b in zip(full, two, strict=True))
    if mode != "off":  # every token is cached: the cache holds just the two layers the run needs
        assert cache.held == needed_bytes(open_store(store), cache.annotations(), layers=2)
        assert cache.held * 3 == needed_bytes(open_store(store), cache.annotations()) * 2


def test_pooled_loader_reading_one_layer_equals_slicing_after(store):
    config = LoaderConfig(batch_size=5, videos_per_batch=3, seed=5)
    full = _epochs(StreamingLoader(store, config))
    one = _epochs(StreamingLoader(store, LoaderConfig(batch_size=5, videos_per_batch=3, seed=5, layers=1)))
    assert all(_same(_sliced(a, 1), b) for a, b in zip(full, one, strict=True))
    with pytest.raises(ValueError, match="layers must be in 1..3"):
        list(StreamingLoader(store, LoaderConfig(layers=4)))


def test_model_inputs_of_the_layers_read_equal_those_of_all_layers(synthetic):
    spec = get_dataset("tacos")
    cpu = torch.device("cpu")
    full = UniformLoader(_cache(synthetic, "ram"), synthetic, batch_size=8, seed=0)
    two = UniformLoader(_cache(synthetic, "ram", 2), synthetic, batch_size=8, seed=0, layers=2)
    for a, b in zip(_epochs(full, 1), _epochs(two, 1), strict=True):
        x = model_inputs(a, spec, 2, cpu, torch.Generator().manual_seed(3))
        y = model_inputs(b, spec, 2, cpu, torch.Generator().manual_seed(3))
        assert all(torch.equal(s, t) for s, t in zip(x.tensors(), y.tensors(), strict=True))


def test_the_run_cache_and_loaders_hold_only_the_model_layers(synthetic):
    cfg = synthetic_run_config(SPEC, "tacos", [*TINY, "train.cache=ram"])
    _, data = open_run_data(cfg, synthetic, "cpu")
    batch = next(iter(data.loader))
    assert batch.video.shape[2] == batch.query.shape[2] == 2
    assert data.val_loader is not None and next(iter(data.val_loader)).video.shape[2] == 2
    assert data.loader.cache.manifest.layers == 2 and data.loader.read_threads == 3


# --- the device cache: gathers only -------------------------------------------------------------------------


def test_device_gathers_copy_no_tokens_on_the_host_and_stay_in_the_calling_thread(store, monkeypatch):
    cache = _cache(store, "device", layers=2)  # the GPU path, gathered on the CPU here
    host = _epochs(UniformLoader(_cache(store, "ram", layers=2), store, batch_size=6, seed=2, layers=2))
    calls: set[str] = set()

    def host_copy(*_args, **_kwargs):
        raise AssertionError("a host copy of tokens on the device path")

    for name in ("map_video", "read_video", "map_stored", "read_stored", "read_query"):
        monkeypatch.setattr(cache, name, host_copy)
    video_tensor = cache.video_tensor

    def traced(vid):
        calls.add(threading.current_thread().name)
        return video_tensor(vid)

    monkeypatch.setattr(cache, "video_tensor", traced)
    gathered = _epochs(UniformLoader(cache, store, batch_size=6, seed=2, layers=2, read_threads=4))
    assert all(_same(a, b) for a, b in zip(host, gathered, strict=True))
    assert calls == {threading.current_thread().name}  # on the caller's CUDA stream
    pooled = _epochs(StreamingLoader(cache, LoaderConfig(batch_size=4, layers=2)))
    assert sum(len(b) for b in pooled) == 2 * len(cache.annotations())
    assert calls == {threading.current_thread().name}


# --- side-stream prefetch -----------------------------------------------------------------------------------


def _plain_inputs(data, cfg: RunConfig, epoch: int) -> list[tuple[ModelInputs, int]]:
    """What :func:`epoch_inputs` yields, built without it."""
    data.loader.set_epoch(epoch)
    generator = pos_clip_generator(cfg.train.seed, epoch)
    device = torch.device("cpu")
    return [(model_inputs(b, data.spec, cfg.model.layers, device, generator), len(b)) for b in data.loader]


def test_epoch_inputs_equal_the_plain_path_in_order(synthetic):
    cfg = synthetic_run_config(SPEC, "tacos", TINY)
    _, data = open_run_data(cfg, synthetic, "cpu")
    for epoch in range(2):
        got = list(epoch_inputs(data.loader, cfg, data.spec, data.device, epoch))
        want = _plain_inputs(data, cfg, epoch)
        assert [size for _, size in got] == [size for _, size in want] and len(got) > 1
        for (x, _), (y, _) in zip(got, want, strict=True):
            assert all(torch.equal(s, t) for s, t in zip(x.tensors(), y.tensors(), strict=True))
    batches = list(data.loader)
    as_is = side_stream_batches(iter(batches), torch.device("cpu"))
    assert all(a is b for a, b in zip(as_is, batches, strict=True))


class _Stream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: _Stream) -> None:
        self.log.append(("wait", self.name, other.name))


def test_side_stream_moves_each_batch_there_and_orders_the_current_stream_after_it(monkeypatch):
    """The CUDA branch with recording stand-ins for the stream API (no GPU needed)."""
    log: list = []
    current = ["main"]
    side, main = _Stream("side", log), _Stream("main", log)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: main)

    @contextmanager
    def on(stream: _Stream):
        current.append(stream.name)
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.append(("record", id(t), s.name)))

    def moved(batch: Batch, i: int) -> Batch:
        log.append(("move", i, current[-1]))
        return batch

    def batches():
        for i in range(3):
            log.append(("build", i, current[-1]))
            tensors = [torch.full((1,), float(i + j)) for j in range(6)]
            batch = Batch(*tensors, queries=[], vids=[str(i)])
            monkeypatch.setattr(batch, "tokens_to", lambda *_, b=batch, i=i, **__: moved(b, i))
            yield batch

    out = []
    for batch in side_stream_batches(batches(), torch.device("cuda")):
        i = int(batch.vids[0])
        log.append(("step", i, current[-1]))
        out.append(batch)
    for i, batch in enumerate(out):
        start = log.index(("build", i, "side"))  # read and moved under the side stream
        assert log.index(("move", i, "side")) > start
        step = log.index(("step", i, "main"))  # stepped under the current one, after
        between = log[start + 1 : step]
        assert ("wait", "main", "side") in between
        recorded = {entry[1] for entry in between if entry[0] == "record" and entry[2] == "main"}
        assert recorded == {id(batch.video), id(batch.query)}
    assert log.index(("step", 0, "main")) < log.index(("build", 1, "side"))  # built lazily, during step 0


# --- the pooled loader's memory bound -----------------------------------------------------------------------


def _cut_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and CUT in r.getMessage()]


def test_a_cutting_memory_bound_is_said_once_with_the_knob_that_lifts_it(synthetic, caplog):
    caplog.set_level(logging.WARNING)
    cfg = synthetic_run_config(SPEC, "tacos", [*TINY, "train.batching=pooled", "train.loader_memory_gb=2e-6"])
    _, data = open_run_data(cfg, synthetic, "cpu")
    assert len(_cut_warnings(caplog)) == 1  # at set-up, before any batch
    sizes = []
    for epoch in range(2):
        sizes += [size for _, size in epoch_inputs(data.loader, cfg, data.spec, data.device, epoch)]
    [message] = _cut_warnings(caplog)
    plan = data.loader.dataset.epoch_plan(0)
    fewest = min(size for size, cut in zip(plan.sizes, plan.cut, strict=True) if cut)
    assert min(sizes) < 8 and "batch_size=8" in message and f"as few as {fewest}," in message
    needed = re.search(r"--set train.loader_memory_gb=(\d+)", message)
    assert needed is not None and "train.loader_memory_gb=2e-06" in message

    caplog.clear()
    for extra in ([f"train.loader_memory_gb={needed.group(1)}"], ["train.batching=uniform"]):
        whole = synthetic_run_config(SPEC, "tacos", [*TINY, "train.batching=pooled", *extra])
        _, data = open_run_data(whole, synthetic, "cpu")
        sizes = [size for _, size in epoch_inputs(data.loader, whole, data.spec, data.device, 0)]
        assert all(size == 8 for size in sizes[:-1])
    assert _cut_warnings(caplog) == []


def test_the_plan_is_the_batches_and_a_later_cut_is_said_when_its_epoch_starts(store, caplog):
    caplog.set_level(logging.WARNING)
    biggest = max(open_store(store).video_nbytes(v) for v in open_store(store).video_ids())
    config = LoaderConfig(batch_size=6, videos_per_batch=3, seed=1, prefetch_videos=2)
    loader = StreamingLoader(store, config, report_cuts=True)
    assert _cut_warnings(caplog) == [] and not any(loader.dataset.epoch_plan(0).cut)
    config.max_bytes = 2 * biggest  # from now on the bound binds
    for epoch in range(3):
        loader.set_epoch(epoch)
        plan = loader.dataset.epoch_plan(epoch)
        assert [len(b) for b in loader] == plan.sizes and any(plan.cut)
    assert len(_cut_warnings(caplog)) == 1 and "pass 2 over the data" in _cut_warnings(caplog)[0]
    silent = StreamingLoader(store, config)  # the validation loader: nothing to say
    assert list(silent) and len(_cut_warnings(caplog)) == 1


def test_rundata_pooled_loader_runs_in_process_when_tokens_are_cached(synthetic):
    for cache, workers in (("ram", 0), ("off", 2)):
        cfg = synthetic_run_config(SPEC, "tacos", [*TINY, "train.batching=pooled", f"train.cache={cache}",
                                                   "train.num_workers=2"])
        store = open_store(synthetic)
        cached = rundata.token_cache(store, cfg, set(), None, torch.device("cpu"), (1, 1))
        loader = rundata.train_loader(synthetic, cached, cfg, "train", keep=set(), pin=False)
        assert isinstance(loader, StreamingLoader) and loader.config.num_workers == workers
        assert loader.config.layers == 2 and loader.config.read_threads == 3
