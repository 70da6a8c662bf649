"""Loader batch -> model inputs and targets, on the training device.

The streaming loader (:mod:`train.data.loader`) yields each video's tokens once per batch,
``video`` (V, T, k', P, C) float16, with ``video_index`` (B,) naming the row of each query. This
module moves the V videos to the device, keeps the last ``k`` layers (the loaders already hold just
those, so the copy is contiguous), expands them to one row per query there (so host memory and
host-to-device copies stay per video) and builds the per-query targets of :mod:`train.data.targets`,
padded as the reference collate pads them (saliency 0, boundary rows ``+inf``).

On CUDA every host-to-device copy is asynchronous: the loaders hand pinned batches, and the targets
are built straight into pinned host tensors; nothing here waits for the GPU. On the CPU the copies
are no-ops and the results are those of plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shards.datasets import DatasetSpec
from train.data.assembly import Batch
from train.data.targets import QueryTargets, query_targets, sample_positive
from train.model import Targets


@dataclass
class ModelInputs:
    """Arguments of :class:`train.model.R2Tuning` for one batch of B queries.

    Attributes:
        video: (B, T, k, P, C) float32 tokens, one row per query (padded frames are zero).
        video_mask: (B, T) bool, True on the clips the query uses.
        query: (B, L, k, Cq) float32 tokens. query_mask: (B, L) bool.
        fps: (B,) float32 clips per second of each query's video.
        targets: ground truth (``None`` when built for inference).
    """

    video: torch.Tensor
    video_mask: torch.Tensor
    query: torch.Tensor
    query_mask: torch.Tensor
    fps: torch.Tensor
    targets: Targets | None = None

    def __len__(self) -> int:
        return self.video.size(0)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the inputs, the targets' included."""
        found = [self.video, self.video_mask, self.query, self.query_mask, self.fps]
        if self.targets is not None:
            t = self.targets
            found += [t.saliency, t.pos_clip, t.fps, *([] if t.boundary is None else [t.boundary])]
        return found


def per_query_targets(batch: Batch, spec: DatasetSpec) -> list[QueryTargets]:
    """Targets of every query of ``batch``, for its video's real length and fps."""
    lengths = batch.video_mask.sum(dim=1).tolist()
    rows = batch.video_index.tolist()
    fps = batch.fps.tolist()
    pairs = zip(batch.queries, rows, strict=True)
    return [query_targets(q, int(lengths[r]), float(fps[r]), spec) for q, r in pairs]


def collate_targets(
    targets: list[QueryTargets], frames: int, generator: torch.Generator, pin: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pad per-query targets to a batch and draw one positive clip per query.

    Args:
        targets: B per-query targets. frames: T, padded length of the batch.
        generator: draws ``pos_clip`` (one ``torch.randint`` per query, in order).
        pin: build the tensors in pinned host memory (for asynchronous copies to a GPU).

    Returns:
        saliency (B, T) float32 (0-padded), pos_clip (B,) int64, boundary (B, M, 2) float32 seconds
        padded with ``+inf`` rows (``None`` when no query has a window), on the host.

    Raises:
        ValueError: a query has no positive clip (filter such queries out before training).
    """
    size = len(targets)
    rows = max((len(t.boundary) for t in targets), default=0)
    saliency_t = torch.zeros((size, frames), dtype=torch.float32, pin_memory=pin)
    pos_clip_t = torch.zeros(size, dtype=torch.int64, pin_memory=pin)
    boundary_t = torch.full((size, rows, 2), float("inf"), dtype=torch.float32, pin_memory=pin)
    saliency, pos_clip, boundary = saliency_t.numpy(), pos_clip_t.numpy(), boundary_t.numpy()
    for i, t in enumerate(targets):
        if len(t.positives) == 0:
            raise ValueError(f"query #{i} of the batch has no positive clip; it cannot be trained on")
        saliency[i, : t.num_clips] = t.saliency
        pos_clip[i] = sample_positive(t.positives, generator)
        boundary[i, : len(t.boundary)] = t.boundary
    return saliency_t, pos_clip_t, boundary_t if rows else None


def expand_tokens(
    batch: Batch, layers: int, device: torch.device, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query video tokens on ``device``: (B, T, layers, P, C) float32 and the (B, T) video mask.

    The V distinct videos are copied to the device once (last ``layers`` layers only) and indexed there
    by ``index``, ``batch.video_index`` on ``device``.
    """
    video = batch.video[:, :, -layers:].to(device, non_blocking=True)
    mask = batch.video_mask.to(device, non_blocking=True)
    return video.index_select(0, index).float(), mask.index_select(0, index)


def model_inputs(
    batch: Batch,
    spec: DatasetSpec,
    layers: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> ModelInputs:
    """Model inputs of ``batch`` on ``device``; with ``generator`` also the training targets.

    Highlight-detection videos are cut to their annotated clips (as the reference does in training
    and validation): the clips beyond are masked and zeroed.

    Args:
        batch: from :class:`train.data.loader.StreamingLoader`.
        spec: dataset of the store (decides the saliency and positive-clip rules).
        layers: k, CLIP layers the model fuses (the last ``k`` of the stored ones).
        device: where the tensors go.
        generator: CPU generator that draws ``pos_clip``; ``None`` builds no targets.
    """
    pin = device.type == "cuda"
    index = batch.video_index.to(device, non_blocking=True)
    video, video_mask = expand_tokens(batch, layers, device, index)
    query = batch.query[:, :, -layers:].to(device, non_blocking=True).float()
    query_mask = batch.query_mask.to(device, non_blocking=True)
    fps = batch.fps.to(device, non_blocking=True).index_select(0, index)
    inputs = ModelInputs(video, video_mask, query, query_mask, fps)
    if generator is None and spec.task != "hd":
        return inputs
    targets = per_query_targets(batch, spec)
    if spec.task == "hd":
        lengths = torch.tensor([t.num_clips for t in targets], pin_memory=pin).to(device, non_blocking=True)
        keep = torch.arange(video.size(1), device=device)[None] < lengths[:, None]
        inputs.video_mask = video_mask & keep
        video.masked_fill_(~inputs.video_mask[:, :, None, None, None], 0.0)
    if generator is not None:
        saliency, pos_clip, boundary = collate_targets(targets, video.size(1), generator, pin)
        inputs.targets = Targets(
            saliency=saliency.to(device, non_blocking=True),
            pos_clip=pos_clip.to(device, non_blocking=True),
            fps=fps,
            boundary=None if boundary is None else boundary.to(device, non_blocking=True),
        )
    return inputs
