"""Figures a person wants to look at: saliency over time with the predicted moments.

Uses matplotlib's non-interactive Agg backend, so it works on headless machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shards.atomic import atomic_path


def plot_prediction(
    saliency: np.ndarray,
    fps: float,
    moments: np.ndarray,
    out_path: str | Path,
    *,
    query: str = "",
    title: str = "",
    top_k: int = 3,
    ground_truth: Sequence[Sequence[float]] = (),
) -> Path:
    """Write a PNG of the saliency curve with the top predicted moments shaded.

    Args:
        saliency: ``(T,)`` per-clip saliency; clip ``t`` covers ``[t / fps, (t + 1) / fps)`` seconds.
        fps: clips per second of the sampled video.
        moments: ``(N, 3)`` rows ``[start_s, end_s, score]`` sorted by score, descending.
        out_path: where the PNG goes (written atomically).
        query: the sentence, shown as the figure title.
        title: a second title line (e.g. the video name).
        top_k: how many moments to shade.
        ground_truth: optional ``[[start_s, end_s], ...]`` windows drawn as a bar below the curve.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saliency = np.asarray(saliency, dtype=np.float64).reshape(-1)
    moments = np.asarray(moments, dtype=np.float64).reshape(-1, 3)
    t = (np.arange(len(saliency)) + 0.5) / fps
    duration = len(saliency) / fps

    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=120)
    ax.plot(t, saliency, color="#1f4e79", lw=1.8, marker="o", ms=3, label="saliency")
    ax.fill_between(t, saliency, color="#1f4e79", alpha=0.08)
    colors = ["#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
    for rank, (start, end, score) in enumerate(moments[:top_k]):
        color = colors[rank % len(colors)]
        ax.axvspan(start, end, color=color, alpha=0.22 if rank == 0 else 0.12)
        ax.annotate(
            f"#{rank + 1} {start:.1f}–{end:.1f}s ({score:.2f})",
            xy=((start + end) / 2, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(0, -12 - 11 * rank),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            color=color,
        )
    low = float(min(saliency.min(initial=0.0), 0.0))
    for i, (start, end) in enumerate(ground_truth):
        ax.hlines(low, start, end, colors="black", lw=5, label="ground truth" if i == 0 else "_nolegend_")
    ax.set_xlim(0, max(duration, 1e-6))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("saliency")
    heading = f"“{query}”" if query else ""
    if title:
        heading = f"{heading}\n{title}" if heading else title
    ax.set_title(heading, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()

    out_path = Path(out_path)
    try:
        with atomic_path(out_path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out_path
