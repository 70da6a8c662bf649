"""Typed run configuration: model, loss, optimiser and training-loop knobs, plus presets.

A :class:`RunConfig` is a tree of dataclasses. Every leaf is a knob that can be changed from the
command line with ``--set key=value`` (:func:`apply_overrides`), using the dotted field name
(``model.dropout=0.3``, ``optim.lr=1e-4``) or a flat alias for the common ones (``lr``,
``batch_size``, ``epochs``, ``loss_sal``, ... see :data:`ALIASES`).

Presets (:func:`get_preset`) reproduce the reference configs of R²-Tuning (ViT-B/32 numbers; other
backbones only change the token dimensions): ``qvhighlights``, ``charades``, ``tacos``, ``ego4d``,
``youtube_<domain>`` (e.g. ``youtube_dog``) and ``tvsum_<DOMAIN>`` (e.g. ``tvsum_BK``), plus ``custom``
for one's own videos (a starting point, docs/custom-data.md). Evaluation settings (NMS, clip rounding
unit, key metric) come from :mod:`shards.datasets`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from shards.backbones import TokenDims, find_backbone, get_backbone, normalize_backbone
from shards.datasets import get_dataset
from shards.errors import ConfigError


@dataclass
class ModelConfig:
    """Architecture of the R² model (reference: ``configs/_base_/models/model.py``).

    Attributes:
        arch: CLIP backbone whose cached tokens feed the model (a store of another backbone is refused).
        video_tokens, video_width, text_width: token dimensions P, C, Cq; ``None`` takes the value of
            the backbone registry (:mod:`shards.backbones`) for ``arch``. The trainer sets them from
            the store's manifest, so ``config.json`` and checkpoints record the dims the model was built for.
        layers: k, number of last CLIP layers fused by the R² block.
        dims: D, hidden width of the model.
        strides: temporal strides of the conv pyramid (powers of two, the first must be 1).
        use_tef: append the temporal endpoint feature (t/T, (t+1)/T) to every visual token.
        dropout: dropout of the R² block's video/query projections.
        heads: attention heads of the temporal decoder layer.
        ffn_ratio: hidden width of the decoder FFN as a multiple of ``dims``.
        droppath: drop-path rate on each residual branch of the decoder layer.
        coord_head: predict boundaries (moment retrieval); ``False`` for highlight-only configs.
        merge_cls_sal: multiply the class-score saliency by cos(video, query) at inference.
        max_num_moment: number of top-scoring windows returned at inference.
    """

    arch: str = "ViT-B-32"
    video_tokens: int | None = None
    video_width: int | None = None
    text_width: int | None = None
    layers: int = 4
    dims: int = 256
    strides: tuple[int, ...] = (1, 2, 4, 8)
    use_tef: bool = True
    dropout: float = 0.5
    heads: int = 8
    ffn_ratio: int = 4
    droppath: float = 0.1
    coord_head: bool = True
    merge_cls_sal: bool = True
    max_num_moment: int = 50

    def known_token_dims(self) -> tuple[int | None, ...]:
        """(P, C, Cq) as far as known: each field when set, else the backbone registry's value for
        :attr:`arch`, else ``None``."""
        backbone = find_backbone(self.arch)
        table = backbone.token_dims if backbone is not None else (None, None, None)
        given = (self.video_tokens, self.video_width, self.text_width)
        return tuple(g if g is not None else t for g, t in zip(given, table, strict=True))

    def token_dims(self) -> TokenDims:
        """(P, C, Cq) the model is built for.

        Raises:
            ConfigError: a dim is unset and the backbone registry does not describe :attr:`arch`.
        """
        p, c, cq = self.video_tokens, self.video_width, self.text_width
        if p is None or c is None or cq is None:
            try:
                table = get_backbone(self.arch).token_dims
            except ConfigError as err:
                raise ConfigError(
                    f"{err}; or set its token dims with --set model.video_tokens=P --set "
                    "model.video_width=C --set model.text_width=Cq, or train on a store, which records them"
                ) from None
            p = table.video_tokens if p is None else p
            c = table.video_width if c is None else c
            cq = table.text_width if cq is None else cq
        return TokenDims(p, c, cq)


@dataclass
class LossConfig:
    """BundleLoss weights (reference: focal 1.0 + L1 0.2 + sampled NCE 0.1 + 2 x InfoNCE 0.1).

    Attributes:
        sample_radius: centre-sampling radius of the class targets, in strides.
        cls_loss: ``focal`` (targets from GT windows) or ``dynamic_bce`` (targets = saliency, HD configs).
        cls_weight, reg_weight, sal_weight, video_cal_weight, layer_cal_weight: loss weights
            (``reg_weight`` only applies when ``model.coord_head``).
        sal_direction: directions of the sampled NCE saliency loss: ``row`` (over time), ``col`` (over batch).
        temperature: temperature of the NCE losses (fixed, not learned).
    """

    sample_radius: float = 1.5
    cls_loss: str = "focal"
    cls_weight: float = 1.0
    reg_weight: float = 0.2
    sal_weight: float = 0.1
    sal_direction: tuple[str, ...] = ("row", "col")
    video_cal_weight: float = 0.1
    layer_cal_weight: float = 0.1
    temperature: float = 0.07


@dataclass
class OptimConfig:
    """AdamW + step decay per epoch + linear warm-up per iteration (see :mod:`train.engine.schedule`).

    Attributes:
        lr: peak learning rate.
        weight_decay: AdamW weight decay (applies to every trainable parameter).
        lr_steps: 0-based epochs at which the rate is multiplied by ``lr_gamma``.
        lr_gamma: decay factor.
        warmup_iters: linear warm-up length in optimiser iterations.
        warmup_ratio: rate at iteration 0 as a fraction of ``lr``.
        grad_clip: max global L2 norm of the gradients (``None``: no clipping).
    """

    lr: float = 5e-4
    weight_decay: float = 1e-4
    lr_steps: tuple[int, ...] = (20,)
    lr_gamma: float = 0.1
    warmup_iters: int = 500
    warmup_ratio: float = 1e-3
    grad_clip: float | None = 35.0


@dataclass
class TrainConfig:
    """Training-loop knobs.

    Attributes:
        epochs: number of passes over the (repeated) training set.
        batch_size: queries per optimiser step.
        repeat: the training set is repeated this many times per epoch (QVHighlights: 4).
        seed: random seed of the run.
        train_split: split of the store's annotations trained on.
        val_split: split validated on (best checkpoint, ``best.json``); ``None``: ``val`` when the store
            has such queries, else ``test``, else no validation. The ``tacos`` preset sets ``test``, the
            split the reference validates on (``train.val_split=val`` selects on TACoS's held-out ``val``).
        val_every: validate every this many epochs.
        save_every_epoch: also keep every epoch's weights as ``epoch_{N:03d}.pt`` (1-based ``N``, the
            ``best.pt`` format), as the reference saves every epoch.
        allow_missing: validate on the queries that have tokens when some annotated queries of the
            validation split have none (their count is logged and recorded as ``val_missing``); off:
            such a store is an error, as the reference scores every annotated query.
        batching: ``uniform`` (default, the reference's): every epoch a uniform shuffle of the training
            queries (``repeat`` times over), cut into batches of ``batch_size``, the last partial,
            decided in the main process from (seed, epoch) only; ``pooled`` (opt-in, streams with
            less I/O): each batch fills round-robin from ``pool_size`` videos in flight, so in-batch
            negatives are more often queries of the same video (docs/training.md).
        cache: where the tokens of the run live (:mod:`train.data.cache`): ``auto`` (default: the GPU
            when they fit, else host RAM when they fit, else stream), ``device``, ``ram`` or ``off``.
        cache_gb: bound of the cache in GiB (``None``: half of the free GPU / available host memory).
        num_workers: loader worker processes that fetch streamed batches (``cache=off``), never
            decide them; with the cache on, both loaders run in the main process (threads:
            ``read_threads``).
        pool_size: ``pooled`` batching only: videos in flight that each batch draws its queries from,
            round-robin: a batch spans about ``max(pool_size, batch_size / queries per video)`` videos.
        loader_memory_gb: ``pooled`` batching only: bound on the video tokens the loader holds at once,
            in GiB; a batch whose videos would exceed it is emitted early with fewer queries.
        amp: fp16 autocast + gradient scaling on CUDA (heads and losses stay fp32).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        verify_reads: check every token read against the store's CRC-32 of its chunks (a corrupt
            chunk stops the run with an error naming it); ``false`` only for a store that
            ``r2 shards verify`` reported ok (docs/store.md gives the cost).
        log_every: optimizer steps between two reads of the per-step values (losses, gradient norm,
            skipped steps) from the device: the steps in between never wait on the GPU.
        read_threads: threads that assemble host batches (reads from the store or the RAM cache into
            pinned buffers).
        compile: ``torch.compile`` the R² model (opt-in; same outputs as eager within float tolerance).
        deterministic: beyond the cuDNN switches every run sets as the reference does
            (``cudnn.deterministic`` on, ``cudnn.benchmark`` off), also
            ``torch.use_deterministic_algorithms``: bit-reproducible GPU runs, slower (docs/training.md).
    """

    epochs: int = 30
    batch_size: int = 128
    repeat: int = 1
    seed: int = 42
    train_split: str = "train"
    val_split: str | None = None
    val_every: int = 1
    save_every_epoch: bool = False
    allow_missing: bool = False
    batching: str = "uniform"
    cache: str = "auto"
    cache_gb: float | None = None
    num_workers: int = 2
    pool_size: int = 8
    loader_memory_gb: float = 4.0
    amp: bool = True
    device: str = "auto"
    verify_reads: bool = True
    log_every: int = 50
    read_threads: int = 4
    compile: bool = False
    deterministic: bool = False


@dataclass
class RunConfig:
    """Everything a training run needs besides the data.

    Attributes:
        preset: name of the preset this config started from.
        dataset: dataset registry name (``shards.datasets``); the registry gives the evaluation
            settings (NMS, clip unit, key metric).
        domain: YouTube Highlights / TVSum domain, else ``None``.
    """

    preset: str = "qvhighlights"
    dataset: str = "qvhighlights"
    domain: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested dict of plain JSON types (tuples become lists)."""
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; missing keys keep their defaults.

        Raises:
            ConfigError: unknown key or value of the wrong type.
        """
        cfg = cls()
        # configs saved by earlier versions copy the dataset registry's settings into an `eval` section
        data = {key: value for key, value in data.items() if key != "eval"}
        for key, value in _flatten(data):
            _set_field(cfg, key, value)
        validate(cfg)
        return cfg


ALIASES: dict[str, str] = {
    "arch": "model.arch",
    "dropout": "model.dropout",
    "strides": "model.strides",
    "lr": "optim.lr",
    "wd": "optim.weight_decay",
    "weight_decay": "optim.weight_decay",
    "warmup": "optim.warmup_iters",
    "grad_clip": "optim.grad_clip",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "seed": "train.seed",
    "amp": "train.amp",
    "device": "train.device",
    "loss_cls": "loss.cls_weight",
    "loss_reg": "loss.reg_weight",
    "loss_sal": "loss.sal_weight",
    "loss_video_cal": "loss.video_cal_weight",
    "loss_layer_cal": "loss.layer_cal_weight",
}
"""Flat names accepted by :func:`apply_overrides` for the most used knobs."""

_HD_MODEL = {"strides": (1,), "use_tef": False, "merge_cls_sal": False, "coord_head": False}
_HD_LOSS = {"cls_loss": "dynamic_bce", "sal_direction": ("row",)}

_MR_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "qvhighlights": {
        "optim": {"lr": 5e-4, "lr_steps": (20,), "warmup_iters": 500},
        "train": {"epochs": 30, "batch_size": 128, "repeat": 4},
    },
    "ego4d": {
        "model": {"dropout": 0.3},
        "optim": {"lr": 2.5e-4, "lr_steps": (20,), "warmup_iters": 500},
        "train": {"epochs": 30, "batch_size": 32},
    },
    "charades": {
        "model": {"dropout": 0.35},
        "loss": {"sal_weight": 0.01},
        "optim": {"lr": 2.5e-4, "lr_steps": (30,), "warmup_iters": 500},
        "train": {"epochs": 50, "batch_size": 32},
    },
    "tacos": {
        "loss": {"sal_weight": 0.05},
        "optim": {"lr": 2.5e-4, "lr_steps": (50,), "warmup_iters": 500},
        "train": {"epochs": 100, "batch_size": 32, "val_split": "test"},
    },
    # One's own videos (docs/custom-data.md): the Charades-STA recipe with a warm-up that a dataset of a
    # few hundred queries leaves early; a starting point to sweep, not a tuned setting.
    "custom": {
        "model": {"dropout": 0.3},
        "optim": {"lr": 2.5e-4, "lr_steps": (40,), "warmup_iters": 20},
        "train": {"epochs": 50, "batch_size": 32},
    },
}
_HD_EPOCHS = {"youtube": 200, "tvsum": 500}


def preset_names() -> list[str]:
    """All preset names: the four moment-retrieval sets, then ``youtube_<domain>``, ``tvsum_<DOMAIN>``."""
    names = list(_MR_PRESETS)
    for dataset in _HD_EPOCHS:
        names += [f"{dataset}_{domain}" for domain in get_dataset(dataset).domains]
    return names


def get_preset(name: str, arch: str = "ViT-B-32") -> RunConfig:
    """The reference configuration of preset ``name`` (case-insensitive) for backbone ``arch``.

    A backbone the registry (:mod:`shards.backbones`) does not describe leaves the token dims unset
    (see :class:`ModelConfig`).

    Raises:
        ConfigError: unknown preset (the message lists the valid ones) or an empty backbone name.
    """
    by_lower = {n.lower(): n for n in preset_names()}
    canonical = by_lower.get(name.strip().lower())
    if canonical is None:
        close = difflib.get_close_matches(name.strip().lower(), list(by_lower), n=3)
        hint = f" (did you mean {', '.join(by_lower[c] for c in close)}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; valid presets: {', '.join(preset_names())}")
    dataset, _, domain = canonical.partition("_")
    cfg = RunConfig(preset=canonical, dataset=dataset, domain=domain or None)
    cfg.model.arch = normalize_backbone(arch)
    if dataset in _MR_PRESETS:
        overrides = _MR_PRESETS[dataset]
    else:
        overrides = {
            "model": _HD_MODEL,
            "loss": _HD_LOSS,
            "optim": {"lr": 5e-4, "lr_steps": (), "warmup_iters": 50},
            "train": {"epochs": _HD_EPOCHS[dataset], "batch_size": 4},
        }
    for section, values in overrides.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    validate(cfg)
    return cfg


def apply_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """Apply ``["key=value", ...]`` to ``cfg`` in place (and return it).

    Keys are dotted field names (``model.dropout``) or :data:`ALIASES`; values are converted to the
    field's type (``1e-4``, ``true``, ``none``, ``1,2,4`` or ``[1,2,4]`` for tuples).

    Raises:
        ConfigError: malformed item, unknown key (with close matches), bad value or invalid result.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"malformed override {item!r}: expected key=value, e.g. optim.lr=1e-4")
        key = key.strip()
        _set_field(cfg, ALIASES.get(key, key), text.strip(), shown=key)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Check cross-field constraints.

    Raises:
        ConfigError: the first violated constraint, naming the field.
    """
    m, lo = cfg.model, cfg.loss
    m.arch = normalize_backbone(m.arch)
    checks = [
        (m.layers >= 1, "model.layers must be >= 1"),
        (
            all(d is None or d >= 1 for d in (m.video_tokens, m.video_width, m.text_width)),
            "model.video_tokens, model.video_width and model.text_width must be >= 1 or none",
        ),
        (
            m.dims >= 1 and m.heads >= 1 and m.dims % m.heads == 0,
            "model.dims must be a multiple of model.heads",
        ),
        (len(m.strides) >= 1 and m.strides[0] == 1, "model.strides must start with 1"),
        (all(s > 0 and s & (s - 1) == 0 for s in m.strides), "model.strides must be powers of two"),
        (list(m.strides) == sorted(set(m.strides)), "model.strides must be strictly increasing"),
        (0 <= m.dropout < 1 and 0 <= m.droppath < 1, "model.dropout and model.droppath must be in [0, 1)"),
        (m.max_num_moment >= 1, "model.max_num_moment must be >= 1"),
        (lo.cls_loss in ("focal", "dynamic_bce"), "loss.cls_loss must be 'focal' or 'dynamic_bce'"),
        (
            len(lo.sal_direction) >= 1 and set(lo.sal_direction) <= {"row", "col"},
            "loss.sal_direction must be a non-empty subset of row,col",
        ),
        (lo.temperature > 0 and lo.sample_radius > 0, "loss.temperature and loss.sample_radius must be > 0"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.grad_clip is None or cfg.optim.grad_clip > 0, "optim.grad_clip must be > 0 or none"),
        (
            cfg.train.epochs >= 1 and cfg.train.batch_size >= 1,
            "train.epochs and train.batch_size must be >= 1",
        ),
        (cfg.train.repeat >= 1 and cfg.train.val_every >= 1, "train.repeat and train.val_every must be >= 1"),
        (cfg.train.pool_size >= 1, "train.pool_size must be >= 1"),
        (cfg.train.loader_memory_gb > 0, "train.loader_memory_gb must be > 0"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
        (cfg.train.read_threads >= 1, "train.read_threads must be >= 1"),
        (cfg.train.batching in ("uniform", "pooled"), "train.batching must be uniform or pooled"),
        (cfg.train.cache in ("auto", "device", "ram", "off"), "train.cache must be auto, device, ram or off"),
        (cfg.train.cache_gb is None or cfg.train.cache_gb > 0, "train.cache_gb must be > 0 or none"),
        (
            bool(cfg.train.train_split) and cfg.train.val_split != "",
            "train.train_split must be a split name and train.val_split a split name or none",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"invalid config: {message}")


def config_keys() -> list[str]:
    """All dotted leaf keys of :class:`RunConfig`."""
    return [key for key, _ in _flatten(RunConfig().to_dict())]


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _set_field(cfg: RunConfig, key: str, value: Any, shown: str | None = None) -> None:
    """Set dotted ``key`` of ``cfg`` to ``value`` converted to the field's type."""
    *path, leaf = key.split(".")
    target: Any = cfg
    for part in path:
        child = getattr(target, part, None) if part in _field_names(target) else None
        if not dataclasses.is_dataclass(child):
            _unknown_key(shown or key)
        target = child
    if leaf not in _field_names(target) or dataclasses.is_dataclass(getattr(target, leaf)):
        _unknown_key(shown or key)
    hint = typing.get_type_hints(type(target))[leaf]
    setattr(target, leaf, _convert(value, hint, shown or key))


def _field_names(obj: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()


def _unknown_key(key: str) -> typing.NoReturn:
    known = config_keys() + list(ALIASES)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] == leaf][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"unknown config key {key!r}{hint} (dotted field names, e.g. model.dropout; see docs/model.md)"
    )


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"none", "null", ""}


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Convert ``value`` (text from the command line, or a JSON value) to type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return _convert(value, inner[0], key)
    if origin is tuple:
        items = value
        if isinstance(value, str):
            text = value.strip().strip("[]()")
            items = [t.strip().strip("'\"") for t in text.split(",") if t.strip()]
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"bad value {value!r} for {key}: expected a comma-separated list")
        return tuple(_convert(v, args[0], key) for v in items)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in _TRUE | _FALSE:
                raise ValueError(text)
            return text in _TRUE
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value) if not isinstance(value, str) else int(value.strip())
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if math.isnan(number):
                raise ValueError(value)
            return number
        if hint is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except ValueError:
        raise ConfigError(f"bad value {value!r} for {key}: expected {hint.__name__}") from None
    raise ConfigError(f"config key {key} has an unsupported type {hint!r}")
