"""Plain-text tables of :func:`eval.metrics.evaluate` results, for people (JSON is for programs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

BUCKET_ORDER = ("full", "short", "middle", "long")
_MR_COLUMNS = (
    ("R1@0.3", "MR-R1", "0.3"),
    ("R1@0.5", "MR-R1", "0.5"),
    ("R1@0.7", "MR-R1", "0.7"),
    ("R5@0.3", "MR-R5", "0.3"),
    ("R5@0.5", "MR-R5", "0.5"),
    ("R5@0.7", "MR-R5", "0.7"),
    ("mAP@0.5", "MR-mAP", "0.5"),
    ("mAP@0.75", "MR-mAP", "0.75"),
    ("mAP", "MR-mAP", "average"),
    ("mIoU", "MR-mIoU", None),
)
_HL_LEVELS = (("Fair", 2), ("Good", 3), ("VeryGood", 4))


def _grid(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Left-aligned first column, right-aligned numbers (2 decimals), two spaces between columns."""
    cells = [list(header)] + [
        [r[0]] + [f"{v:.2f}" if isinstance(v, float) else str(v) for v in r[1:]] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)])
        for row in cells
    ]


def _retrieval_rows(metrics: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for bucket in BUCKET_ORDER:
        scores = metrics.get(bucket)
        if scores is None:
            continue
        row: list[Any] = [bucket]
        for _, group, key in _MR_COLUMNS:
            row.append(scores[group] if key is None else scores[group][key])
        rows.append(row)
    return rows


def format_table(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """Render an evaluation result as text tables.

    Moment retrieval: one row per length bucket with R1 / R5 at IoU 0.3/0.5/0.7, mAP@0.5,
    mAP@0.75, mAP (0.5:0.95) and mIoU. Highlight detection: mAP and Hit@1 per rating level.
    YouTube Highlights / TVSum: mAP and video count per domain, then the mean.

    Args:
        metrics: the dict returned by :func:`eval.metrics.evaluate`.
        title: first line, e.g. the dataset name.
    """
    lines = [title] if title else []
    retrieval = _retrieval_rows(metrics)
    if retrieval:
        lines += ["", "Moment retrieval (%)"] + _grid(["bucket"] + [c[0] for c in _MR_COLUMNS], retrieval)
    rows = [
        [f"{name} (>={minimum})", metrics[f"HL-min-{name}"]["HL-mAP"], metrics[f"HL-min-{name}"]["HL-Hit1"]]
        for name, minimum in _HL_LEVELS
        if f"HL-min-{name}" in metrics
    ]
    if rows:
        lines += ["", "Highlight detection (%)"] + _grid(["rating", "mAP", "Hit@1"], rows)
    domains = metrics.get("domains")
    if domains:
        rows = [[name, d["mAP"], d["videos"]] for name, d in domains.items()]
        rows.append(["mean", metrics["brief"]["mAP"], sum(d["videos"] for d in domains.values())])
        lines += ["", "Highlight detection (%)"] + _grid(["domain", "mAP", "videos"], rows)
    return "\n".join(lines).strip("\n")
