"""Inference decoding of the model outputs: windows in seconds and per-frame saliency.

This is the raw model output of the reference's test mode: windows are neither clamped to the video,
rounded to the clip unit nor NMS-ed (that post-processing is in ``eval/postprocess.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.model.outputs import R2Output


def decode_boundaries(
    class_logits: torch.Tensor, coord: torch.Tensor, points: torch.Tensor, fps: float, top_k: int = 50
) -> torch.Tensor:
    """Windows of the ``top_k`` highest-scoring points of one sample.

    Point ``(t, _, _, s)`` with distances ``(d_s, d_e)`` (in strides) and score ``p = σ(logit)`` gives
    ``[(t - d_s·s) / fps, (t + d_e·s) / fps, p]``.

    Args:
        class_logits: (N,). coord: (N, 2). points: (N, 4), time in clips. fps: clips per second.

    Returns:
        (min(N, top_k), 3) ``[start_s, end_s, score]`` sorted by score, descending.
    """
    score = class_logits.sigmoid()
    t, stride = points[:, 0], points[:, 3]
    start = (t - coord[:, 0] * stride) / fps
    end = (t + coord[:, 1] * stride) / fps
    windows = torch.stack((start, end, score), dim=-1)
    order = score.argsort(descending=True)[:top_k]
    return windows[order]


def decode_saliency(
    class_logits: torch.Tensor,
    level_sizes: list[int],
    length: int,
    video_emb: torch.Tensor | None = None,
    query_emb: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-frame saliency of one sample.

    Each level's scores ``σ(logit)`` are repeated ``int(T / T_l)`` times and padded at the end with
    their last value to length T; the saliency is the maximum over levels, multiplied by
    ``cos(video_emb[t], query_emb)`` when both embeddings are given.

    Args:
        class_logits: (N,) with N = Σ level_sizes. length: T. video_emb: (T, D). query_emb: (D,).

    Returns:
        (T,).
    """
    upsampled = []
    for scores in class_logits.sigmoid().split(level_sizes):
        rep = scores.repeat_interleave(length // scores.numel())
        upsampled.append(torch.cat((rep, rep[-1:].expand(length - rep.numel()))))
    saliency = torch.stack(upsampled).amax(dim=0)
    if video_emb is not None and query_emb is not None:
        saliency = saliency * F.cosine_similarity(video_emb, query_emb[None], dim=-1)
    return saliency


def decode_sample(
    out: R2Output, index: int, fps: float, top_k: int = 50, merge_cls_sal: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Windows and saliency of sample ``index`` of a batch.

    With padding, the sample's valid frames and pyramid steps are kept; the reference evaluates one
    sample at a time (no padding), and padding changes the TEF, positional encoding and conv borders,
    so batch size 1 reproduces it exactly.

    Returns:
        windows (≤ top_k, 3) ``[start_s, end_s, score]`` (``None`` without coord head) and
        saliency (T_valid,).
    """
    valid_points = out.pymid_mask[index]
    windows = None
    if out.coord is not None:
        windows = decode_boundaries(
            out.class_logits[index][valid_points],
            out.coord[index][valid_points],
            out.points[valid_points],
            fps,
            top_k,
        )
    length = out.video_emb.size(1)
    video_emb = out.video_emb[index] if merge_cls_sal else None
    saliency = decode_saliency(
        out.class_logits[index], out.level_sizes, length, video_emb, out.query_emb[index]
    )
    return windows, saliency[: int(out.video_mask[index].sum())]
