"""The reference's calling convention, ``model(data, mode)``, as an adapter over :class:`R2Tuning`.

The official code feeds the model one padded batch dict and a mode (``train`` | ``val`` | ``test``).
This toolkit's model takes tokens and masks (:meth:`R2Tuning.forward`); the parity tests use this
adapter to feed the official fixture's inputs as the official code does
(``tests/data/r2_parity/README.md``).
"""

from __future__ import annotations

from typing import Any

import torch

from train.model.decode import decode_sample
from train.model.r2tuning import R2Tuning
from train.model.targets import Targets

MODES = ("train", "val", "test")


def forward_reference(model: R2Tuning, data: dict[str, Any], mode: str = "test") -> dict[str, Any]:
    """Run ``model`` on an official-style batch.

    ``data['video']`` (B, T, N*P*C) and ``data['query']`` (B, L, N*Cq) are padded with ``+inf``
    (masks come from the finiteness of entry 0); ``data['fps']`` is a list of floats; in ``train``
    and ``val`` mode also ``boundary`` (B, M, 2) seconds (+inf rows), ``saliency`` (B, T) and
    ``pos_clip`` (B, 1). The caller's tensors are not modified.

    Returns:
        ``train``: ``{loss_*}``; ``val``: losses and ``_out``; ``test``: ``{'_out': {'saliency' (T,),
        'boundary' (≤ max_num_moment, 3)}}`` (``boundary`` only with a coord head; B must be 1).

    Raises:
        ValueError: unknown ``mode``, or a batch of more than one sample in ``val`` / ``test`` mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    video, video_mask = _split_padding(data["video"])
    query, query_mask = _split_padding(data["query"])
    (batch, frames), tokens = video.shape[:2], query.size(1)
    dims = model.token_dims
    video = video.view(batch, frames, -1, dims.video_tokens, dims.video_width)
    query = query.view(batch, tokens, -1, dims.text_width)
    fps = torch.as_tensor(data["fps"], dtype=torch.float32, device=video.device).reshape(batch)
    targets = None
    if mode != "test":
        targets = Targets(
            saliency=data["saliency"],
            pos_clip=data["pos_clip"].reshape(batch),
            fps=fps,
            boundary=data.get("boundary"),
        )
    out = model(video, video_mask, query, query_mask, targets=targets)
    result: dict[str, Any] = dict(out.losses or {})
    if mode != "train":
        if batch != 1:
            raise ValueError(f"{mode} mode decodes one sample at a time, got a batch of {batch}")
        cfg = model.cfg
        windows, saliency = decode_sample(out, 0, float(fps[0]), cfg.max_num_moment, cfg.merge_cls_sal)
        result["_out"] = {"saliency": saliency}
        if windows is not None:
            result["_out"]["boundary"] = windows
    return result


def _split_padding(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, F) padded with non-finite rows -> (copy with non-finite entries zeroed, mask (B, T) bool)."""
    finite = x.isfinite()
    return torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)), finite[:, :, 0]
