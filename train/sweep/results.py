"""Sweep results: configurations over seeds, ranking by the key metric, the text table, CSV/JSON files, plot.

A *configuration* is the set of trials that differ only in their training seed
(:func:`train.sweep.spec.config_params`). Its statistics over the finished seeds are the mean, the
sample standard deviation (ddof=1; ``nan`` for one seed) and ``n``; failed and pending seeds are
counted apart and left out of the statistics. Configurations are ranked by the mean of the key metric.

Two views, chosen by :meth:`~train.sweep.spec.SweepSpec.seeded` (is the training seed swept?):

- **one trial per configuration** (no seed swept): the table and ``results.csv`` have one row per
  trial, as a sweep always had -- no ± columns that would only ever hold one value;
- **seeded** (``--seeds N``, or a seed key in the grid / ranges): one row per configuration with
  ``mean ± std`` and ``n``; the best line and command name the configuration, never a seed.

Files written into the sweep directory (each atomically, rewritten at the end of every run):

- ``results.csv``  -- ranked rows. One trial per configuration: rank, index, name, status, key metric,
  every other metric, swept parameters, seconds, shared (models in its data pass), reused, error.
  Seeded: rank, config, n, failed, pending, ``<metric>_mean`` and ``<metric>_std`` for the key metric
  then every other metric, the configuration's parameters, seeds (finished ones), seconds (sum),
  reused (count), error (the first);
- ``results.json`` -- ``seeded``, the ranked ``configurations`` (statistics per metric, seeds, trial
  names), every trial record (with its configuration and that configuration's rank), the best
  (configuration when seeded, else trial) and its ``r2 train`` command; ``NaN`` is written as ``null``;
- ``sweep.png``    -- the key metric against each swept parameter (log x-axis for log ranges and
  for positive numeric grids spanning at least a factor 10; categorical axes for text values);
  seeded: the mean with a ±std bar per configuration and each seed's value as a dot.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shards.atomic import atomic_path
from train.engine.runlog import write_json_atomic, write_text_atomic
from train.sweep.spec import config_params, seed_of
from train.sweep.trials import TrialRecord

if TYPE_CHECKING:
    from train.sweep.runner import SweepPlan

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
PLOT_FILE = "sweep.png"
_STATUS_ORDER = {"ok": 0, "failed": 1, "pending": 2}


@dataclass(frozen=True)
class Stats:
    """Statistics of one metric over a configuration's finished seeds.

    Attributes:
        mean: arithmetic mean (``nan`` when ``n == 0``).
        std: sample standard deviation, ddof=1 (``nan`` when ``n < 2``).
        n: number of finished seeds that reported the metric.
        values: the per-seed values, in trial order.
    """

    mean: float
    std: float
    n: int
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        """Mean, sample std (ddof=1) and count of ``values``."""
        mean = statistics.fmean(values) if values else math.nan
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return cls(mean, std, len(values), tuple(values))


@dataclass
class ConfigResult:
    """The trials of one configuration (equal overrides but for the training seed).

    Attributes:
        index: position of the configuration in the sweep (order of its first trial), 0-based.
        params: swept overrides without the seed (:func:`train.sweep.spec.config_params`).
        records: its trials in plan order (one per seed).
    """

    index: int
    params: dict[str, str]
    records: list[TrialRecord]

    def finished(self) -> list[TrialRecord]:
        """The trials that finished (status ``ok``)."""
        return [r for r in self.records if r.status == "ok"]

    def stats(self, metric: str) -> Stats:
        """:class:`Stats` of ``metric`` over the finished trials that reported it (``nan`` left out)."""
        values = [float(r.metrics[metric]) for r in self.finished() if metric in r.metrics]
        return Stats.of([v for v in values if not math.isnan(v)])

    def seeds(self) -> list[str]:
        """Training seeds of the finished trials (``default`` where the seed is not swept)."""
        return [seed_of(r.params) or "default" for r in self.finished()]

    def count(self, status: str) -> int:
        """Number of trials with ``status`` (``ok``, ``failed``, ``pending``)."""
        return sum(r.status == status for r in self.records)


@dataclass
class SweepResult:
    """All trial records of a plan (plan order) with grouping and ranking helpers."""

    plan: SweepPlan
    records: list[TrialRecord]

    @property
    def seeded(self) -> bool:
        """Whether the training seed is swept, so that configurations hold several trials."""
        return self.plan.spec.seeded()

    def key_value(self, record: TrialRecord) -> float:
        """The key metric of ``record`` (``nan`` when missing or the trial did not finish)."""
        value = record.metrics.get(self.plan.key_metric, math.nan) if record.status == "ok" else math.nan
        return float(value)

    def configurations(self) -> list[ConfigResult]:
        """The trials grouped by configuration, in the order of each configuration's first trial."""
        groups: dict[tuple[tuple[str, str], ...], ConfigResult] = {}
        for record in self.records:
            params = config_params(record.params)
            key = tuple(sorted(params.items()))
            if key not in groups:
                groups[key] = ConfigResult(len(groups), params, [])
            groups[key].records.append(record)
        return list(groups.values())

    def ranked_configurations(self) -> list[ConfigResult]:
        """Configurations best first by the mean key metric; then those whose trials finished without
        the key metric, then those with failed trials only, then pending ones."""
        sign = -1.0 if self.plan.higher_is_better else 1.0

        def order(config: ConfigResult) -> tuple:
            status = min(_STATUS_ORDER[r.status] for r in config.records)
            stats = config.stats(self.plan.key_metric)
            return (status, stats.n == 0, 0.0 if stats.n == 0 else sign * stats.mean, config.index)

        return sorted(self.configurations(), key=order)

    def ranked(self) -> list[TrialRecord]:
        """Every trial, by the rank of its configuration, then in plan order within it.

        With one trial per configuration: finished trials best first (missing metric last), then
        failed, then pending ones.
        """
        return [r for config in self.ranked_configurations() for r in _trial_order(config.records)]

    def best(self) -> ConfigResult | None:
        """The configuration with the best mean key metric, or ``None`` when none finished with it."""
        ranked = self.ranked_configurations()
        if ranked and ranked[0].stats(self.plan.key_metric).n > 0:
            return ranked[0]
        return None

    def counts(self) -> dict[str, int]:
        """Number of trials per status, plus ``reused`` (finished in an earlier run)."""
        counts = {status: sum(r.status == status for r in self.records) for status in _STATUS_ORDER}
        counts["reused"] = sum(r.reused for r in self.records)
        return counts


def _trial_order(records: list[TrialRecord]) -> list[TrialRecord]:
    return sorted(records, key=lambda r: (_STATUS_ORDER[r.status], r.index))


def best_command(result: SweepResult) -> str | None:
    """A ready-to-run ``r2 train`` command for the best configuration (fixed and swept overrides, never
    the seed of a seeded sweep), or ``None``.

    It trains into ``SWEEP_DIR/best``; ``--arch`` is added for stores of a backbone other than ViT-B-32, and
    ``--threads N`` with the torch thread count the configuration's trials recorded (results differ in the
    last bits between thread counts).
    """
    best = result.best()
    if best is None:
        return None
    plan = result.plan
    parts = ["r2", "train", "--preset", plan.preset, "--store", plan.store]
    parts += ["--out", str(plan.out_dir / "best")]
    if plan.arch and plan.arch != "ViT-B-32":
        parts += ["--arch", plan.arch]
    threads = next((r.threads for r in best.finished() if r.threads is not None), None)
    if threads is not None:
        parts += ["--threads", str(threads)]
    for key, value in {**plan.spec.fixed, **best.params}.items():
        parts += ["--set", f"{key}={value}"]
    return " ".join(shlex.quote(p) for p in parts)


def params_text(params: dict[str, str]) -> str:
    """``lr=1e-4 loss_sal=0.05``, or ``(fixed settings only)`` for a sweep over seeds alone."""
    return " ".join(f"{k}={v}" for k, v in params.items()) or "(fixed settings only)"


def format_mean_std(stats: Stats) -> str:
    """``47.62 ± 0.83``: the mean to 4 significant digits and the std to the same decimals; the mean alone
    for one seed; ``-`` for none."""
    if stats.n == 0:
        return "-"
    magnitude = math.floor(math.log10(abs(stats.mean))) if stats.mean and math.isfinite(stats.mean) else 1
    decimals = min(max(0, 3 - magnitude), 8)
    if stats.n == 1:
        return f"{stats.mean:.{decimals}f}"
    return f"{stats.mean:.{decimals}f} ± {stats.std:.{decimals}f}"


def best_summary(result: SweepResult) -> str | None:
    """The ``best: ...`` lines the CLI prints (the configuration, its statistics, the command), or ``None``.

    Seeded sweeps name the configuration and the seeds it was averaged over; the command trains it
    once, with the preset's seed unless ``--set seed=S`` is added (given as information only).
    """
    best = result.best()
    if best is None:
        return None
    command = best_command(result)
    if not result.seeded:
        return f"best: {best.records[0].name}\n  {command}"
    key = result.plan.key_metric
    stats = best.stats(key)
    seeds = best.seeds()
    lines = [
        f"best: configuration {best.index:03d}: {params_text(best.params)}",
        f"  {key} {format_mean_std(stats)} (mean ± std over n={stats.n} seeds: {', '.join(seeds)})",
        f"  {command}",
        "  (one run of the configuration; add --set seed=S for one of the seeds above -- a single run is"
        " one draw, report the mean ± std)",
    ]
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4g}"


def _align(rows: list[list[str]]) -> str:
    """Left-aligned columns, the last one free."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
             for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _trial_status(record: TrialRecord) -> str:
    status = record.status + (" (reused)" if record.reused else "")
    if record.shared > 1:
        status += f" (shared x{record.shared})"
    if record.error:
        status += f": {record.error[:60]}"
    return status


def _config_status(config: ConfigResult) -> str:
    """``3 ok``, ``2 ok, 1 failed: <first error>``, ``3 ok (3 reused)``."""
    parts = [f"{config.count(s)} {s}" for s in _STATUS_ORDER if config.count(s)]
    status = ", ".join(parts)
    reused = sum(r.reused for r in config.records)
    if reused:
        status += f" ({reused} reused)"
    error = next((r.error for r in config.records if r.error), None)
    if error:
        status += f": {error[:60]}"
    return status


def _seconds(records: list[TrialRecord]) -> float:
    return sum(r.seconds for r in records if r.status != "pending")


def format_table(result: SweepResult) -> str:
    """A plain-text table, ranked.

    One trial per configuration: rank, trial, key metric, swept parameters, status, seconds. Seeded:
    rank, config, ``KEY mean ± std``, n (finished seeds), the configuration's parameters, status
    (counts of ok / failed / pending seeds, the first error), seconds (sum over its trials).
    """
    key = result.plan.key_metric
    if not result.seeded:
        keys = result.plan.spec.swept_keys()
        rows = [["rank", "trial", key, *keys, "status", "seconds"]]
        for rank, record in enumerate(result.ranked(), 1):
            rows.append([str(rank), f"{record.index:03d}", _fmt(result.key_value(record)),
                         *(record.params.get(k, "") for k in keys), _trial_status(record),
                         f"{record.seconds:.1f}" if record.status != "pending" else "-"])
        return _align(rows)
    keys = result.plan.spec.config_keys()
    rows = [["rank", "config", f"{key} mean ± std", "n", *keys, "status", "seconds"]]
    for rank, config in enumerate(result.ranked_configurations(), 1):
        stats = config.stats(key)
        seconds = f"{_seconds(config.records):.1f}" if config.count("pending") < len(config.records) else "-"
        rows.append([str(rank), f"{config.index:03d}", format_mean_std(stats), str(stats.n),
                     *(config.params.get(k, "") for k in keys), _config_status(config), seconds])
    return _align(rows)


def _metric_names(result: SweepResult) -> list[str]:
    names = sorted({k for r in result.records for k in r.metrics} - {result.plan.key_metric})
    return [result.plan.key_metric, *names]


def _number_or_blank(value: float) -> float | str:
    return "" if math.isnan(value) else value


COUNT_METRICS = frozenset({"best_epoch", "epochs"})
"""Reported values that count epochs: written as integers (``3``, not ``3.0``)."""


def _metric_cell(name: str, value: Any) -> Any:
    """A trial's metric as a CSV cell: counts as integers, the rest as they are."""
    if name in COUNT_METRICS and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def results_csv(result: SweepResult) -> str:
    """The ranked rows as CSV text (see the module docstring for the columns of either view)."""
    metrics = _metric_names(result)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if not result.seeded:
        keys = result.plan.spec.swept_keys()
        writer.writerow(["rank", "index", "name", "status", *metrics, *keys, "seconds", "shared", "reused",
                         "error"])
        for rank, r in enumerate(result.ranked(), 1):
            values = [_metric_cell(m, r.metrics.get(m, "")) for m in metrics]
            writer.writerow([rank, r.index, r.name, r.status, *values, *(r.params.get(k, "") for k in keys),
                             f"{r.seconds:.3f}", r.shared, int(r.reused), r.error or ""])
        return out.getvalue()
    keys = result.plan.spec.config_keys()
    stat_columns = [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    writer.writerow(["rank", "config", "n", "failed", "pending", *stat_columns, *keys, "seeds", "seconds",
                     "reused", "error"])
    for rank, config in enumerate(result.ranked_configurations(), 1):
        stats = [config.stats(m) for m in metrics]
        values = [_number_or_blank(v) for s in stats for v in (s.mean, s.std)]
        error = next((r.error for r in config.records if r.error), "")
        writer.writerow([rank, config.index, config.stats(result.plan.key_metric).n, config.count("failed"),
                         config.count("pending"), *values, *(config.params.get(k, "") for k in keys),
                         " ".join(config.seeds()), f"{_seconds(config.records):.3f}",
                         sum(r.reused for r in config.records), error])
    return out.getvalue()


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


def _config_json(result: SweepResult, config: ConfigResult, rank: int) -> dict[str, Any]:
    stats = {m: config.stats(m) for m in _metric_names(result)}
    return {
        "rank": rank,
        "config": config.index,
        "params": config.params,
        "n": stats[result.plan.key_metric].n,
        "failed": config.count("failed"),
        "pending": config.count("pending"),
        "seeds": config.seeds(),
        "metrics": {m: {"mean": _json_number(s.mean), "std": _json_number(s.std), "n": s.n,
                        "values": list(s.values)} for m, s in stats.items() if s.n},
        "seconds": _seconds(config.records),
        "trials": [r.name for r in config.records],
    }


def results_json(result: SweepResult) -> dict[str, Any]:
    """Configurations, trials, the best and its command as a JSON-ready dict (``nan`` -> ``None``)."""
    ranked = result.ranked_configurations()
    configs = [_config_json(result, c, rank) for rank, c in enumerate(ranked, 1)]
    rank_of = {c.index: rank for rank, c in enumerate(ranked, 1)}
    config_of = {r.index: c.index for c in ranked for r in c.records}
    best = result.best()
    best_json: dict[str, Any] | None = None
    if best is not None and result.seeded:
        best_json = {**configs[0], "command": best_command(result)}
    elif best is not None:
        trial = best.records[0]
        best_json = {"name": trial.name, "params": trial.params, "metrics": trial.metrics,
                     "command": best_command(result)}
    return {
        "preset": result.plan.preset,
        "store": result.plan.store,
        "key_metric": result.plan.key_metric,
        "higher_is_better": result.plan.higher_is_better,
        "seeded": result.seeded,
        "counts": result.counts(),
        "best": best_json,
        "configurations": configs,
        "trials": [{"rank": rank_of[config_of[r.index]], "config": config_of[r.index], **r.to_dict()}
                   for r in result.ranked()],
    }


def _as_numbers(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plot_sweep(result: SweepResult, path: Path) -> bool:
    """Draw the key metric against each swept parameter into ``path`` (PNG); ``False`` if nothing to plot.

    One point per configuration that finished: its value, or (seeded) its mean with a ±std bar and a
    dot per seed. A seed-only sweep has one panel with its one configuration. Uses matplotlib's Agg
    canvas directly, so the caller's pyplot backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key = result.plan.key_metric
    spec = result.plan.spec
    done = [c for c in result.configurations() if c.stats(key).n > 0]
    keys = spec.config_keys()
    if not done or not (keys or result.seeded):
        return False
    best = result.best()
    fig = Figure(figsize=(4.0 * max(len(keys), 1), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, name in enumerate(keys or [None]):
        ax = fig.add_subplot(1, max(len(keys), 1), i + 1)
        texts = [c.params[name] if name else result.plan.preset for c in done]
        numbers = _as_numbers(texts) if name else None
        xs: list[float]
        if numbers is None:
            labels = list(spec.grid.get(name, [])) if name else []
            labels += [t for t in sorted(set(texts)) if t not in labels]
            xs = [float(labels.index(t)) for t in texts]
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            xs = numbers
            lo, hi = min(numbers), max(numbers)
            wide_grid = name in spec.grid and lo > 0 and hi / lo >= 10
            if name in spec.log_keys() or wide_grid:
                ax.set_xscale("log")
        stats = [c.stats(key) for c in done]
        means = [s.mean for s in stats]
        if result.seeded:
            seed_xs = [x for x, s in zip(xs, stats, strict=True) for _ in s.values]
            ax.scatter(seed_xs, [v for s in stats for v in s.values], s=10, color="0.6", label="seeds")
            errors = [0.0 if math.isnan(s.std) else s.std for s in stats]
            ax.errorbar(xs, means, yerr=errors, fmt="o", ms=5, color="tab:blue", capsize=3,
                        label="mean ± std")
        else:
            ax.scatter(xs, means, s=28, color="tab:blue", alpha=0.8, label="trials")
        if best is not None:
            j = done.index(best)
            ax.scatter([xs[j]], [means[j]], s=90, facecolors="none", edgecolors="tab:red", linewidths=2,
                       label="best")
        if min(v for s in stats for v in s.values) >= 0:  # metrics are non-negative: no axis below 0
            bottom, top = ax.get_ylim()
            ax.set_ylim(max(bottom, 0.0), top if top > 0 else 1.0)
        ax.set_xlabel(name or "configuration")
        ax.set_ylabel(f"{key} (mean over seeds)" if result.seeded else key)
        ax.grid(True, alpha=0.3)
    fig.axes[0].legend(loc="best", fontsize=8)
    what = f"{len(done)} finished trials"
    if result.seeded:
        what = f"{len(done)} configurations\n(mean ± std over seeds, grey: each seed)"
    fig.suptitle(f"sweep of {result.plan.preset}: {what}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return True


def read_counts(out_dir: Path) -> dict[str, int]:
    """The trial counts per status (and ``reused``) that ``results.json`` in ``out_dir`` holds; empty when
    there is none yet."""
    path = out_dir / RESULTS_JSON
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text(encoding="utf-8"))["counts"])


def write_results(result: SweepResult) -> None:
    """Write ``results.csv``, ``results.json`` and ``sweep.png`` into the sweep directory."""
    out = result.plan.out_dir
    write_text_atomic(out / RESULTS_CSV, results_csv(result))
    write_json_atomic(out / RESULTS_JSON, results_json(result))
    if not plot_sweep(result, out / PLOT_FILE):
        (out / PLOT_FILE).unlink(missing_ok=True)
