"""Peak memory of one training step, known before a run starts: what ``r2 train --dry-run`` prints,
what ``r2 train`` checks against the free GPU memory, and what sizes a sweep's shared pass.

:func:`estimate_step` counts the tensors alive at the peak of one step (the start of the backward
pass, when every activation saved for it is still held) for a config, a batch, the longest video T
(clips) and the longest query L (tokens). Shapes: B queries, T clips, k fused layers, P tokens per
frame, C / Cq visual / text width, C' = C + 2 with the TEF, D model width, H heads.

- ``loader batch``: the loader's float16 batch ``(B, T, k, P, C)`` (the loaders read the k fused
  layers only); with the token cache on the GPU it stays there during the step (counted on CUDA; at
  most B distinct videos).
- ``video batch fp32``: the model's float32 copy ``(B, T, k, P, C)`` (the reference feeds float32)
  and the float32 query tokens ``(B, L, k, Cq)``.
- ``next loader batch``: on CUDA the next loader batch is moved to the GPU on a side stream while the
  step runs (:func:`train.engine.rundata.side_stream_batches`); the caching allocator keeps a side
  stream's blocks apart, so the GPU holds one more float16 loader batch (its float32 copy is made on
  the current stream, after the step).
- ``TEF concat fp32``: ``cat(video, TEF)`` ``(B, T, k, P, C')``, kept whole by the first LayerNorm of
  every layer (its input is a slice of it).
- ``token maps``: per layer, what the video token MLP saves: the dropout mask and the input of the
  first Linear ``(B, T, P, C')``, five to six ``(B, T, P, D)`` tensors; with AMP the Linear inputs
  are float16 casts, the second LayerNorm keeps a float32 cast of its input.
- ``spatial pooling``: per layer, the query-to-patch attention ``(B, T, L, P)`` (softmax in float32)
  and two ``(B, T, L, D)`` tensors.
- ``temporal decoder, heads``: per layer :data:`DECODER_TENSORS` ``(B, T, D)`` float32 tensors and the
  attention maps ``(B, H, T, T)``, ``(B, H, T, L)``; pyramid, heads and losses
  :data:`HEAD_TENSORS` ``(B, T_l, D)`` tensors per pyramid step.
- ``backward``: one layer's float32 gradient ``(B, T, P, C')`` and the contiguous copy LayerNorm makes
  of its strided input, or two float32 self-attention gradients ``(B, H, T, T)``, whichever is larger.
- ``weights, grads, AdamW``: 16 bytes per parameter (+2 for the float16 weight casts of AMP).

AMP (float16 autocast) applies on CUDA only, as in training. The estimate is checked against the
peak of live tensors of real steps on the CPU (tests/test_train_memory.py) and, on a GPU, against
``torch.cuda.max_memory_allocated`` of one step and ``max_memory_reserved`` of the training loop
(tests/test_cuda_devices.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import psutil
import torch

from shards.datasets import get_dataset
from shards.errors import ConfigError
from shards.store import FeatureStore
from train.config import RunConfig
from train.model import R2Tuning, count_parameters

log = logging.getLogger(__name__)

GIB = 2**30
CLIP_TEXT_CONTEXT = 77
"""Most tokens of a query (CLIP's text context): L when no store gives the longest query."""
DECODER_TENSORS = 21
"""``(B, T, D)`` float32 tensors one temporal decoder layer keeps for backward (projections, heads
split, LayerNorms, residuals, attention outputs, the 4·D FFN counted as four), counted on a CPU trace."""
HEAD_TENSORS = 6
"""``(B, T_l, D)`` float32 tensors per pyramid step kept by the pyramid convs, heads and losses."""
WARN_SHARE = 0.9
"""A step estimated above this share of the free memory is warned about (above all of it: refused)."""
BATCH, ACTIVATIONS, STATE = "batch", "activations", "state"
"""Kinds of items: read once per batch / one model's forward and backward / held per model."""


@dataclass(frozen=True)
class MemoryItem:
    """One term of the estimate.

    Attributes:
        name: what it is, e.g. ``TEF concat fp32 (B, T, k, P, C')``.
        nbytes: its size in bytes.
        kind: :data:`BATCH` (shared by the models of a sweep's shared pass), :data:`ACTIVATIONS`
            (freed after each model's backward) or :data:`STATE` (weights, gradients, optimizer).
    """

    name: str
    nbytes: int
    kind: str


@dataclass(frozen=True)
class StepMemory:
    """Estimated peak memory of one training step.

    Attributes:
        items: the terms, biggest first.
        batch_size: B. clips: T, longest video. query_tokens: L, longest query.
        device_type: ``cuda`` or ``cpu``. amp: float16 autocast (CUDA with ``train.amp``).
    """

    items: tuple[MemoryItem, ...]
    batch_size: int
    clips: int
    query_tokens: int
    device_type: str
    amp: bool

    @property
    def total(self) -> int:
        """Bytes of the whole step."""
        return sum(item.nbytes for item in self.items)

    def bytes_of(self, kind: str) -> int:
        """Bytes of the items of one kind (:data:`BATCH`, :data:`ACTIVATIONS`, :data:`STATE`)."""
        return sum(item.nbytes for item in self.items if item.kind == kind)

    def summary(self, top: int = 4) -> str:
        """``21.84 GiB (video batch fp32 5.49, TEF concat fp32 5.50, ...)``: total and biggest items."""
        parts = [f"{item.name.split(' (')[0]} {item.nbytes / GIB:.2f}" for item in self.items[:top]]
        return f"{self.total / GIB:.2f} GiB ({', '.join(parts)})"

    def table(self) -> list[str]:
        """One line per item (GiB), biggest first."""
        width = max(len(item.name) for item in self.items)
        return [f"  {item.name:<{width}}  {item.nbytes / GIB:8.2f} GiB" for item in self.items]


def estimate_step(
    cfg: RunConfig,
    clips: int,
    query_tokens: int = CLIP_TEXT_CONTEXT,
    *,
    device_type: str = "cuda",
    prefetch: bool | None = None,
) -> StepMemory:
    """Peak memory of one optimizer step of ``cfg`` (batch ``cfg.train.batch_size``) on a batch
    padded to ``clips`` clips and ``query_tokens`` query tokens.

    Args:
        cfg: the run config; its token dims (P, C, Cq) must be known (``cfg.model.token_dims()``).
        clips: T, the longest video (:func:`store_extent`, or :func:`typical_clips`).
        query_tokens: L, the longest query.
        device_type: ``cuda`` (AMP when ``cfg.train.amp``; the loader batch on the GPU) or ``cpu``.
        prefetch: count the next loader batch staged on a side stream (default: on CUDA, as the loop does).

    Raises:
        ConfigError: unknown token dims.
    """
    m = cfg.model
    p, c, cq = m.token_dims()
    b, t, el, k, d, h = cfg.train.batch_size, clips, query_tokens, m.layers, m.dims, m.heads
    cuda = device_type == "cuda"
    amp = cuda and cfg.train.amp
    act = 2 if amp else 4           # a Linear / matmul output
    cast = 2 if amp else 4          # a Linear's saved input: its float16 cast under AMP, else itself
    extra = 2 if amp else 0         # the float16 copy AMP adds to a float32 softmax output or gradient
    mask = 1 if cuda else 4         # a dropout mask: bool on CUDA, float on the CPU
    c_in = c + 2 if m.use_tef else c
    frames = b * t * p              # tokens of one layer
    steps = sum(t // s for s in m.strides if t >= s)
    with torch.device("meta"):
        params = count_parameters(R2Tuning(m, cfg.loss))

    per_layer_maps = (
        frames * c_in * (cast + mask)                                     # dropout mask, Linear input
        + frames * d * (act + (4 if amp else 0) + mask + cast + 2 * act)  # ReLU, LN, dropout, v_i, v_map
        + frames * 16                                                     # LayerNorm means and rstds
    )
    per_layer_pool = b * t * el * (p * (4 + extra) + 2 * act * d)
    per_layer_decoder = 4 * DECODER_TENSORS * b * t * d + b * h * t * (t + el) * (4 + extra)
    items = [
        MemoryItem("video batch fp32 (B, T, k, P, C)", 4 * b * t * k * p * c + 4 * b * el * k * cq, BATCH),
        MemoryItem("TEF concat fp32 (B, T, k, P, C')", 4 * b * t * k * p * c_in * m.use_tef, ACTIVATIONS),
        MemoryItem("token maps, all layers (B, T, P, C'|D)", k * per_layer_maps, ACTIVATIONS),
        MemoryItem("spatial pooling, all layers (B, T, L, P|D)", k * per_layer_pool, ACTIVATIONS),
        MemoryItem("temporal decoder, heads (B, T, D)",
                   k * per_layer_decoder + 4 * HEAD_TENSORS * b * steps * d, ACTIVATIONS),
        MemoryItem("backward, one layer (B, T, P, C'|B, H, T, T)",
                   max(frames * c_in, b * h * t * t) * (8 + extra), ACTIVATIONS),
        MemoryItem("weights, grads, AdamW", params * (16 + extra), STATE),
    ]
    loader_batch = 2 * b * t * k * p * c + 2 * b * el * k * cq
    if cuda:
        items.append(MemoryItem("loader batch fp16 (B, T, k, P, C)", loader_batch, BATCH))
    if cuda if prefetch is None else prefetch:
        items.append(MemoryItem("next loader batch fp16, prefetched (side stream)", loader_batch, BATCH))
    items = sorted((i for i in items if i.nbytes), key=lambda i: -i.nbytes)
    return StepMemory(tuple(items), b, t, el, device_type, amp)


def typical_clips(dataset: str) -> int:
    """Longest video of ``dataset`` in clips when no store says (the registry's ``longest_clips``)."""
    return get_dataset(dataset).longest_clips


def store_extent(store: FeatureStore) -> tuple[int, int]:
    """(T, L): clips of the store's longest video and tokens of its longest query (metadata only)."""
    clips = max((store.video_length(v) for v in store.video_ids()), default=1)
    tokens = max((store.query_length(q) for q in store.query_ids()), default=1)
    return clips, tokens


def fitting_batch(
    cfg: RunConfig,
    room: int,
    clips: int,
    query_tokens: int,
    *,
    device_type: str = "cuda",
) -> int:
    """Largest batch whose step (:func:`estimate_step` with these arguments) fits ``room`` bytes, 0 when
    not even one query does; the estimate is affine in B."""
    one, two = (
        estimate_step(_with_batch(cfg, n), clips, query_tokens, device_type=device_type).total
        for n in (1, 2)
    )
    per_query = max(two - one, 1)
    return max(0, math.floor((room - (one - per_query)) / per_query))


def _with_batch(cfg: RunConfig, batch_size: int) -> RunConfig:
    return replace(cfg, train=replace(cfg.train, batch_size=batch_size))


def free_bytes(device: torch.device) -> int:
    """Free memory of ``device``: the GPU's (``torch.cuda.mem_get_info``), else the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def judge(cfg: RunConfig, memory: StepMemory, device: torch.device, free: int) -> tuple[str, str]:
    """How ``memory`` (the step of ``cfg``) compares with ``free`` bytes of ``device``.

    Returns:
        ``ok`` (at most :data:`WARN_SHARE` of it), ``close`` or ``over`` (more than all of it), and one
        line naming the estimate, the free memory and, unless ``ok``, the knobs: a batch that fits
        within :data:`WARN_SHARE`, fewer fused layers, a smaller backbone.
    """
    where = f"GPU {device}" if device.type == "cuda" else "host RAM"
    what = (f"one training step of {cfg.preset} on {cfg.model.arch} (batch {cfg.train.batch_size}, "
            f"longest video {memory.clips} clips) needs about {memory.summary()}")
    if memory.total <= WARN_SHARE * free:
        return "ok", f"{what}; it fits the {free / GIB:.2f} GiB free on {where}"
    fit = fitting_batch(cfg, int(WARN_SHARE * free), memory.clips, memory.query_tokens,
                        device_type=memory.device_type)
    smaller = "" if cfg.model.arch == "ViT-B-32" else ", or use a smaller backbone (e.g. ViT-B-32)"
    knobs = (f"--set batch_size={fit} fits" if fit else "no batch fits") + (
        f", or fuse fewer layers (--set model.layers=N){smaller}")
    if memory.total > free:
        return "over", f"{what}, but {where} has {free / GIB:.2f} GiB free: {knobs}"
    share = f"{100 * memory.total / free:.0f}% of the {free / GIB:.2f} GiB free on {where}"
    return "close", f"{what}, {share}: it may run out of memory; {knobs}"


def check_step_memory(
    cfg: RunConfig, extent: tuple[int, int], device: torch.device, free: int | None = None
) -> StepMemory:
    """Estimate one step of ``cfg`` on batches padded to ``extent`` (a store's longest video in clips and
    longest query in tokens, :func:`store_extent`) and compare it with the
    free memory of ``device`` (``free`` bytes when given, :func:`judge`): on a GPU refuse a step that
    does not fit and warn (one log line) when it is close; on the CPU warn only when it exceeds the
    available RAM.

    Raises:
        ConfigError: the step will not fit the GPU; the message names the estimate, the free memory
            and the knobs.
    """
    memory = estimate_step(cfg, *extent, device_type=device.type)
    level, line = judge(cfg, memory, device, free_bytes(device) if free is None else free)
    if level == "over" and device.type == "cuda":
        raise ConfigError(line)
    if level == "over" or (level == "close" and device.type == "cuda"):
        log.warning("%s", line)
    return memory
