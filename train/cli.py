"""``r2 train``: train the R² model on a feature store (``--dry-run``: show the model and the estimated
memory of one training step, :mod:`train.engine.memory`, and stop).

Training itself is :func:`train.engine.trainer.train_run`; the device is ``--device`` or else
``train.device``; ``--threads`` sets torch's intra-op threads (the count a sweep trial recorded, so that
its printed command reproduces it bit for bit).

User errors come before the heavy imports (torch, the engine), within about a second: the preset, the
``--set`` overrides and the store (it must open, :func:`shards.store.open_store`). A store of random-weight
features (a pipeline test) gets one warning. Ctrl-C and SIGTERM (a batch scheduler's pre-emption) stop
the run cleanly (:mod:`train.engine.loop`): one line says where and how to resume, exit status 130 / 143.

``train`` is the command function; ``r2.cli`` registers it as ``r2 train``.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import typer

from shards.cliutil import interrupt_exit_code, interrupt_name, sigterm_as_interrupt
from shards.datasets import get_dataset
from shards.errors import ConfigError, option
from shards.manifest import Manifest
from train.config import ALIASES, RunConfig, apply_overrides, get_preset, preset_names
from train.engine.runlog import RunPaths, read_interrupt, utc_now

log = logging.getLogger(__name__)


def train(
    preset: str = typer.Option(
        ..., "--preset", "-p", help=f"Config preset: {', '.join(preset_names()[:6])}, ..."
    ),
    arch: str | None = typer.Option(
        None,
        "--arch",
        help="Backbone of the cached tokens: any open_clip ViT name or an OpenAI spelling (ViT-B/32, "
        "ViT-L/14@336px); default: the store's, else ViT-B-32.",
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help=f"Override a config key: --set optim.lr=1e-4 (aliases: {', '.join(ALIASES)})."
    ),
    store: Path | None = typer.Option(None, "--store", help="Feature store (Zarr) to train on."),
    out: Path | None = typer.Option(
        None, "--out", help="Run folder (config, logs, checkpoints); default runs/<preset>."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its last checkpoint."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the model summary and the estimated peak memory of one training step "
        "and exit (no store needed; with --store, for its longest video)."
    ),
    device: str | None = typer.Option(
        None, "--device", help="auto | cpu | cuda | cuda:N (default: the config's train.device)."
    ),
    threads: int | None = typer.Option(
        None, "--threads", help="Torch intra-op threads (default: torch's); results differ in the last bits "
        "between thread counts.",
    ),
) -> None:
    """Train R²-Tuning with a preset's reference hyper-parameters (see docs/model.md)."""
    from shards.store import open_store  # no torch: a missing or broken store fails fast

    manifest = open_store(store).manifest if store is not None and store.exists() else None
    arch = arch or (manifest.backbone if manifest is not None else "ViT-B-32")
    cfg = apply_overrides(get_preset(preset, arch=arch), overrides)
    if dry_run:
        typer.echo(dry_run_text(cfg, store, device or cfg.train.device))
        return
    if store is None:
        raise ConfigError("training needs --store (a feature store); or use --dry-run")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: must be >= 1")
    warn_random_features(manifest or open_store(store).manifest, store)  # a missing store: its error
    out = out or Path("runs") / cfg.preset
    again = resume_command(preset, arch, overrides, store, out, device, threads)
    began = utc_now()
    with sigterm_as_interrupt():
        try:
            _train(cfg, store, out, resume, device or cfg.train.device, threads)
        except KeyboardInterrupt as err:
            typer.echo(stop_line(err, out, again, began, cfg.train.epochs), err=True)
            raise SystemExit(interrupt_exit_code(err)) from None


def _train(cfg: RunConfig, store: Path, out: Path, resume: bool, device: str, threads: int | None) -> None:
    """Train (heavy imports here) and print the closing line."""
    from train.engine.trainer import train_run

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    result = train_run(cfg, store, out, resume=resume, device=device)
    best = "no validation"
    if result.best_value is not None:
        best = f"best {result.key_metric} {result.best_value:.2f} at epoch {result.best_epoch}"
    typer.echo(f"{result.epochs} epochs done in {result.run_dir} ({best})")


def warn_random_features(manifest: Manifest, store: Path) -> bool:
    """Warn (one line) when the store at ``store`` holds features of random CLIP weights (manifest
    ``pretrained`` ``random:<seed>``, a pipeline test): the metrics of a model trained on them mean
    nothing. Returns whether it warned."""
    if not manifest.pretrained.startswith("random"):
        return False
    log.warning(
        "store %s holds features of RANDOM CLIP weights (%s, a pipeline test): the model trains, but its "
        "metrics mean nothing; extract with --pretrained openai (the default) for real features",
        store, manifest.pretrained,
    )
    return True


def resume_command(
    preset: str,
    arch: str,
    overrides: list[str],
    store: Path,
    out: Path,
    device: str | None,
    threads: int | None,
) -> str:
    """The ``r2 train`` command that continues the run in ``out``: these options and ``--resume``."""
    args = ["r2", "train", "--preset", preset]
    if arch != "ViT-B-32":
        args += ["--arch", arch]
    for item in overrides:
        args += ["--set", item]
    args += ["--store", str(store), "--out", str(out)]
    if device is not None:
        args += ["--device", device]
    if threads is not None:
        args += ["--threads", str(threads)]
    return option(shlex.join([*args, "--resume"]), "make train RESUME=1 (with the same variables)")


def stop_line(err: KeyboardInterrupt, out: Path, again: str, began: str, epochs: int) -> str:
    """The one line of a run stopped by Ctrl-C or SIGTERM: where (the ``interrupted`` record the loop wrote
    in ``run.json``, :func:`train.engine.records.record_interrupt`, of ``epochs``) and the command that
    resumes it.

    A record older than ``began`` (this command's start, UTC ISO 8601) is an earlier stop's: this one
    came before the loop began."""
    stop = read_interrupt(RunPaths(out))
    where = "before the first epoch"
    if stop is not None and str(stop.get("at", "")) >= began:
        done = stop["epochs_done"]
        saved = f"epochs 1-{done} saved" if done else "no epoch done"
        where = f"at epoch {stop['epoch']}/{epochs}, step {stop['step']} ({saved} in {out})"
    return f"{interrupt_name(err)} {where}; resume with: {again}"


def dry_run_text(cfg: RunConfig, store: Path | None, device: str) -> str:
    """The model summary and the estimated peak memory of one training step of ``cfg``.

    With ``store``: its token dims, longest video and longest query; else the preset's typical longest
    video (:func:`train.engine.memory.typical_clips`) and CLIP's text context. The estimate is for the
    GPU (with AMP when ``train.amp``) unless ``device`` is ``cpu``; where a GPU is visible it says
    whether the step fits its free memory.

    Raises:
        StoreError: ``store`` is missing or does not fit ``cfg``.
    """
    from shards.device import resolve_device, visible_gpus
    from train.engine import memory as plan

    if store is None:
        clips, tokens = plan.typical_clips(cfg.dataset), plan.CLIP_TEXT_CONTEXT
        source = f"the typical longest {get_dataset(cfg.dataset).title} video; --store gives the real one"
    else:
        from shards.store import open_store
        from train.compat import config_for_store

        handle = open_store(store)
        cfg = config_for_store(cfg, handle.manifest, store)
        clips, tokens = plan.store_extent(handle)
        source = f"the longest video of {store}"
    device_type = "cpu" if device.strip().lower() == "cpu" else "cuda"
    memory = plan.estimate_step(cfg, clips, tokens, device_type=device_type)
    on = "the CPU" if device_type == "cpu" else "the GPU" + (" with AMP (fp16)" if memory.amp else "")
    lines = [
        model_summary(cfg),
        "",
        f"estimated peak memory of one training step on {on}: {memory.total / plan.GIB:.2f} GiB",
        f"  batch {memory.batch_size} queries x {clips} clips ({source}) x {tokens} query tokens",
        *memory.table(),
    ]
    if device_type == "cuda" and visible_gpus():
        target = resolve_device(device)
        lines.append(plan.judge(cfg, memory, target, plan.free_bytes(target))[1])
    return "\n".join(lines)


def model_summary(cfg: RunConfig) -> str:
    """Text table of the model's parameters per module, ending with the trainable-parameter count."""
    from train.model import R2Tuning, count_parameters

    model = R2Tuning(cfg.model, cfg.loss)
    m = cfg.model
    p, c, cq = m.token_dims()
    lines = [
        f"preset {cfg.preset} (dataset {cfg.dataset}{'/' + cfg.domain if cfg.domain else ''}), "
        f"backbone {m.arch}: video tokens (T, {m.layers}, {p}, {c}), query tokens (L, {m.layers}, {cq})",
        f"epochs {cfg.train.epochs}, batch {cfg.train.batch_size}, lr {cfg.optim.lr:g}, "
        f"key metric {get_dataset(cfg.dataset).key_metric}",
        "",
        f"{'module':<28}{'parameters':>12}",
    ]
    for name, child in model.named_children():
        lines.append(f"{name:<28}{count_parameters(child):>12,}")
        if name == "adapter":
            lines += [f"  {sub:<26}{count_parameters(mod):>12,}" for sub, mod in child.named_children()]
            lines += [f"  {p:<26}{t.numel():>12,}" for p, t in child.named_parameters(recurse=False)]
    lines += [f"{n:<28}{p.numel():>12,}" for n, p in model.named_parameters(recurse=False)]
    lines.append(f"trainable parameters: {count_parameters(model):,}")
    return "\n".join(lines)
