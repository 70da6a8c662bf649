"""Sweep results: ranking by the preset's key metric, the text table, CSV/JSON files, the plot.

Files written into the sweep directory (each atomically, rewritten at the end of every run):

- ``results.csv``  -- one row per trial, ranked: rank, index, name, status, key metric, every other
  metric, swept parameters, seconds, shared (models in its data pass), reused, error;
- ``results.json`` -- the same records plus the best trial and its ``r2 train`` command;
- ``sweep.png``    -- the key metric against each swept parameter (log x-axis for log ranges and
  for positive numeric grids spanning at least a factor 10; categorical axes for text values).
"""

from __future__ import annotations

import csv
import io
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shards.atomic import atomic_path
from train.engine.runlog import write_json_atomic, write_text_atomic
from train.sweep.trials import TrialRecord

if TYPE_CHECKING:
    from train.sweep.runner import SweepPlan

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
PLOT_FILE = "sweep.png"
_STATUS_ORDER = {"ok": 0, "failed": 1, "pending": 2}


@dataclass
class SweepResult:
    """All trial records of a plan (plan order) with ranking helpers."""

    plan: SweepPlan
    records: list[TrialRecord]

    def key_value(self, record: TrialRecord) -> float:
        """The key metric of ``record`` (``nan`` when missing or the trial did not finish)."""
        value = record.metrics.get(self.plan.key_metric, math.nan) if record.status == "ok" else math.nan
        return float(value)

    def ranked(self) -> list[TrialRecord]:
        """Finished trials best first (missing metric last), then failed, then pending ones."""
        sign = -1.0 if self.plan.higher_is_better else 1.0

        def order(record: TrialRecord) -> tuple:
            value = self.key_value(record)
            missing = math.isnan(value)
            return (_STATUS_ORDER[record.status], missing, 0.0 if missing else sign * value, record.index)

        return sorted(self.records, key=order)

    def best(self) -> TrialRecord | None:
        """The best finished trial with a key metric, or ``None``."""
        ranked = self.ranked()
        if ranked and ranked[0].status == "ok" and not math.isnan(self.key_value(ranked[0])):
            return ranked[0]
        return None

    def counts(self) -> dict[str, int]:
        """Number of trials per status, plus ``reused`` (finished in an earlier run)."""
        counts = {status: sum(r.status == status for r in self.records) for status in _STATUS_ORDER}
        counts["reused"] = sum(r.reused for r in self.records)
        return counts


def _overrides_of(result: SweepResult, record: TrialRecord) -> dict[str, str]:
    return {**result.plan.spec.fixed, **record.params}


def best_command(result: SweepResult) -> str | None:
    """A ready-to-run ``r2 train`` command for the best trial (fixed and swept overrides), or ``None``.

    It trains into ``SWEEP_DIR/best``; ``--arch`` is added for stores of a backbone other than ViT-B-32.
    """
    best = result.best()
    if best is None:
        return None
    plan = result.plan
    parts = ["r2", "train", "--preset", plan.preset, "--store", plan.store]
    parts += ["--out", str(plan.out_dir / "best")]
    if plan.arch and plan.arch != "ViT-B-32":
        parts += ["--arch", plan.arch]
    for key, value in _overrides_of(result, best).items():
        parts += ["--set", f"{key}={value}"]
    return " ".join(shlex.quote(p) for p in parts)


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4g}"


def format_table(result: SweepResult) -> str:
    """A plain-text table of the ranked trials (key metric, swept parameters, status, seconds)."""
    keys = result.plan.spec.swept_keys()
    header = ["rank", "trial", result.plan.key_metric, *keys, "status", "seconds"]
    rows = [header]
    for rank, record in enumerate(result.ranked(), 1):
        status = record.status + (" (reused)" if record.reused else "")
        if record.shared > 1:
            status += f" (shared x{record.shared})"
        if record.error:
            status += f": {record.error[:60]}"
        rows.append([str(rank), f"{record.index:03d}", _fmt(result.key_value(record)),
                     *(record.params.get(k, "") for k in keys), status,
                     f"{record.seconds:.1f}" if record.status != "pending" else "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
             for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _metric_names(result: SweepResult) -> list[str]:
    names = sorted({k for r in result.records for k in r.metrics} - {result.plan.key_metric})
    return [result.plan.key_metric, *names]


def results_csv(result: SweepResult) -> str:
    """The ranked records as CSV text (see the module docstring for the columns)."""
    keys = result.plan.spec.swept_keys()
    metrics = _metric_names(result)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = ["rank", "index", "name", "status", *metrics, *keys, "seconds", "shared", "reused", "error"]
    writer.writerow(header)
    for rank, r in enumerate(result.ranked(), 1):
        values = [r.metrics.get(m, "") for m in metrics]
        writer.writerow([rank, r.index, r.name, r.status, *values, *(r.params.get(k, "") for k in keys),
                         f"{r.seconds:.3f}", r.shared, int(r.reused), r.error or ""])
    return out.getvalue()


def results_json(result: SweepResult) -> dict:
    """The ranked records, the best trial and its command as a JSON-ready dict."""
    best = result.best()
    return {
        "preset": result.plan.preset,
        "store": result.plan.store,
        "key_metric": result.plan.key_metric,
        "higher_is_better": result.plan.higher_is_better,
        "counts": result.counts(),
        "best": None if best is None else {"name": best.name, "params": best.params, "metrics": best.metrics,
                                           "command": best_command(result)},
        "trials": [{"rank": rank, **r.to_dict()} for rank, r in enumerate(result.ranked(), 1)],
    }


def _as_numbers(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plot_sweep(result: SweepResult, path: Path) -> bool:
    """Draw the key metric against each swept parameter into ``path`` (PNG); ``False`` if nothing to plot.

    Uses matplotlib's Agg canvas directly, so the caller's pyplot backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in result.records if not math.isnan(result.key_value(r))]
    keys = result.plan.spec.swept_keys()
    if not done or not keys:
        return False
    best = result.best()
    log_keys = result.plan.spec.log_keys()
    fig = Figure(figsize=(4.0 * len(keys), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        texts = [r.params[key] for r in done]
        numbers = _as_numbers(texts)
        ys = [result.key_value(r) for r in done]
        xs: list[float]
        if numbers is None:
            labels = list(result.plan.spec.grid.get(key, []))
            labels += [t for t in sorted(set(texts)) if t not in labels]
            xs = [float(labels.index(t)) for t in texts]
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            xs = numbers
            lo, hi = min(numbers), max(numbers)
            wide_grid = key in result.plan.spec.grid and lo > 0 and hi / lo >= 10
            if key in log_keys or wide_grid:
                ax.set_xscale("log")
        ax.scatter(xs, ys, s=28, color="tab:blue", alpha=0.8, label="trials")
        if best is not None:
            ax.scatter([xs[done.index(best)]], [result.key_value(best)], s=90, facecolors="none",
                       edgecolors="tab:red", linewidths=2, label="best")
        ax.set_xlabel(key)
        ax.set_ylabel(result.plan.key_metric)
        ax.grid(True, alpha=0.3)
    fig.axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(f"sweep of {result.plan.preset}: {len(done)} finished trials")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return True


def write_results(result: SweepResult) -> None:
    """Write ``results.csv``, ``results.json`` and ``sweep.png`` into the sweep directory."""
    out = result.plan.out_dir
    write_text_atomic(out / RESULTS_CSV, results_csv(result))
    write_json_atomic(out / RESULTS_JSON, results_json(result))
    if not plot_sweep(result, out / PLOT_FILE):
        (out / PLOT_FILE).unlink(missing_ok=True)
